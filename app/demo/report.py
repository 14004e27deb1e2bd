"""The demo's final report: the timeline by phase, the phases, the story check, and the JSON of the run."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafleet.bench.runner import BenchReport
    from lorafleet.demo.calibrate import Calibration
    from lorafleet.demo.config import DemoConfig
    from lorafleet.demo.story import Check, Machine, Phase, PhaseSummary, Slice

JSON_VERSION = 1


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def format_timeline(slices: Sequence[Slice], slice_s: float) -> str:
    """One column per slice, `|` between phases: workers busy, workers up, queue, migrations."""
    if not slices:
        return "(no samples)"
    rows = {"phase": [], "workers busy": [], "workers up": [], "queue": [], "migrations": []}
    width = max(2, max(len(str(s.queue)) for s in slices))
    for i, s in enumerate(slices):
        if i and s.phase != slices[i - 1].phase:
            for cells in rows.values():
                cells.append("|")
        rows["phase"].append(s.phase[0].upper() if i == 0 or s.phase != slices[i - 1].phase else " ")
        rows["workers busy"].append(str(s.busy))
        rows["workers up"].append(str(s.up))
        rows["queue"].append(str(s.queue))
        rows["migrations"].append(str(s.migrations) if s.migrations else ".")
    label = max(len(k) for k in rows)
    lines = [f"timeline: one column per {slice_s:g} s (Q quiet, B burst, C cooldown; | a phase change)"]
    for name, cells in rows.items():
        lines.append(f"  {name:<{label}}  " + " ".join(c.rjust(width) for c in cells).rstrip())
    return "\n".join(lines)


def format_phases(summaries: Sequence[PhaseSummary]) -> str:
    head = [
        "phase",
        "seconds",
        "offered",
        "requests",
        "TTFT p50",
        "tokens/s",
        "busy",
        "queue max",
        "migr.",
        "released",
    ]
    rows = [head]
    for p in summaries:
        rows.append(
            [
                p.name,
                f"{p.start_s:.0f}-{p.end_s:.0f}",
                f"{p.rate_rps:.1f} req/s",
                str(p.requests),
                _ms(p.ttft_p50_s),
                f"{p.tokens_per_s:.0f}",
                f"{p.busy_typical} (max {p.busy_max})",
                str(p.queue_max),
                str(p.migrations),
                str(p.workers_released),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_story(checks: Sequence[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"  [{'ok' if c.ok else 'NOT SHOWN'}] {c.name}: {c.detail}")
        if not c.ok:
            lines.append(f"      why: {c.reason}")
    shown = all(c.ok for c in checks)
    verdict = (
        "the story showed: one worker while quiet, more for the burst, then migrations and release to one"
        if shown
        else "the story did NOT fully show on this run; the reasons are above"
    )
    return "story check:\n" + "\n".join(lines) + f"\n{verdict}"


def run_summary(
    *,
    config: DemoConfig,
    machine: Machine,
    calibration: Calibration,
    phases: Sequence[Phase],
    report: BenchReport,
    summaries: Sequence[PhaseSummary],
    slices: Sequence[Slice],
    checks: Sequence[Check],
    ttft_quiet_p50_s: float | None,
    wall_s: float,
    files: dict[str, str],
) -> dict[str, Any]:
    """Everything a script needs about the run, JSON-ready (the demo prints it with --json)."""
    return {
        "version": JSON_VERSION,
        "story_ok": all(c.ok for c in checks),
        "story": [dataclasses.asdict(c) for c in checks],
        "workers": config.workers,
        "max_batch_size": config.max_batch_size,
        "machine": dataclasses.asdict(machine),
        "calibration": {
            **dataclasses.asdict(calibration),
            "requests_per_s": calibration.requests_per_s,
            "spread": calibration.spread,
        },
        "phases": [dataclasses.asdict(p) for p in summaries],
        "planned_phases": [dataclasses.asdict(p) for p in phases],
        "slice_s": config.slice_s,
        "workers_busy_timeline": [s.busy for s in slices],
        "workers_up_timeline": [s.up for s in slices],
        "queue_timeline": [s.queue for s in slices],
        "migrations_timeline": [s.migrations for s in slices],
        "migrations": report.migrations,
        "workers_released": sum(p.workers_released for p in summaries),
        "ttft_p50_quiet_s": ttft_quiet_p50_s,
        "ttft_s": report.ttft_s,
        "tpot_s": report.tpot_s,
        "tokens_per_s": report.tokens_per_s,
        "requests": report.requests,
        "completed": report.completed,
        "errors": report.errors,
        "workload_wall_s": report.wall_s,
        "wall_s": wall_s,
        "config": {
            k: (str(v) if k.endswith("_dir") and v is not None else v)
            for k, v in dataclasses.asdict(config).items()
        },
        "files": files,
    }
