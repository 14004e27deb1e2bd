"""The demo's story, told from what was measured: a timeline by phase, and a check of the story.

The story lorafleet should show: the packing policy keeps a quiet load on one worker, a burst
spills onto more, and once it passes the consolidation pass migrates the running sequences
together and releases the idle workers, back to one. `check_story` says for each part whether the
run showed it and, when it did not, why, from the figures (load on the machine, the calibration,
the backlog), so a user never has to read it out of a table.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafleet.bench.workload import PlannedRequest, percentile

if TYPE_CHECKING:
    from lorafleet.bench.runner import RequestRecord, WorkerSample
    from lorafleet.demo.calibrate import Calibration
    from lorafleet.demo.config import DemoConfig

QUIET_SPILL_SHARE = 0.1  # the first quiet phase may have more than one worker busy this share of time
TTFT_QUIET_LIMIT_S = 1.0
END_WINDOW_SHARE = 0.25  # "back to one" is judged over this last share of the cooldown


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float
    end_s: float
    rate_rps: float


@dataclass(frozen=True)
class Slice:
    start_s: float
    phase: str
    busy: int  # most workers busy during the slice
    up: int  # most workers up (active) during the slice
    queue: int  # longest queue during the slice
    migrations: int  # sequences migrated during the slice


@dataclass(frozen=True)
class PhaseSummary:
    name: str
    start_s: float
    end_s: float
    rate_rps: float
    requests: int
    ttft_p50_s: float | None
    busy_typical: int  # median of the samples
    busy_max: int
    share_above_one: float  # share of the samples with more than one worker busy
    queue_max: int
    migrations: int
    workers_released: int
    tokens_per_s: float  # the fleet's output rate during the phase


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was measured
    reason: str = ""  # why the story did not show, when it did not


@dataclass(frozen=True)
class Machine:
    cores: int
    load_avg_1m: float

    @classmethod
    def here(cls) -> Machine:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cls(cores, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)


def demo_phases(config: DemoConfig, one_worker_rps: float) -> list[Phase]:
    quiet = config.quiet_load * one_worker_rps
    q, b = config.quiet_s, config.quiet_s + config.burst_s
    return [
        Phase("quiet", 0.0, q, quiet),
        Phase("burst", q, b, config.burst_load * one_worker_rps),
        Phase("cooldown", b, b + config.cooldown_s, quiet),
    ]


def phase_of(phases: Sequence[Phase], t_s: float) -> Phase:
    """The phase a moment belongs to; past the planned end (the last requests finishing) is the last."""
    for p in phases:
        if t_s < p.end_s:
            return p
    return phases[-1]


def timeline(samples: Sequence[WorkerSample], phases: Sequence[Phase], slice_s: float) -> list[Slice]:
    """Equal time slices from 0 to the last sample; a slice without samples repeats the one before."""
    if not samples:
        return []
    end = max(s.t_s for s in samples)
    count = int(end // slice_s) + 1
    slices: list[Slice] = []
    migrated = samples[0].migrations
    for i in range(count):
        inside = [s for s in samples if i * slice_s <= s.t_s < (i + 1) * slice_s]
        phase = phase_of(phases, i * slice_s).name
        if not inside:
            last = slices[-1] if slices else Slice(0.0, phase, 0, 0, 0, 0)
            slices.append(Slice(i * slice_s, phase, last.busy, last.up, last.queue, 0))
            continue
        moved = inside[-1].migrations - migrated
        migrated = inside[-1].migrations
        slices.append(
            Slice(
                i * slice_s,
                phase,
                max(s.busy for s in inside),
                max(s.active for s in inside),
                max(s.queue_len for s in inside),
                moved,
            )
        )
    return slices


def _tokens_in(records: Sequence[RequestRecord], start: float, lo: float, hi: float) -> float:
    """Tokens produced within [lo, hi) s of the run, spreading each request's evenly over its stream."""
    total = 0.0
    for r in records:
        if r.first_token_at is None or r.last_token_at is None or r.tokens == 0:
            continue
        a, b = r.first_token_at - start, r.last_token_at - start
        if b <= a:
            total += r.tokens if lo <= a < hi else 0
            continue
        overlap = max(0.0, min(b, hi) - max(a, lo))
        total += r.tokens * overlap / (b - a)
    return total


def run_start(plan: Sequence[PlannedRequest], records: Sequence[RequestRecord]) -> float:
    """The monotonic clock reading of the run's time 0 (each request was sent at start + at_s)."""
    return min(r.sent_at - p.at_s for p, r in zip(plan, records))


def summarize_phases(
    phases: Sequence[Phase],
    plan: Sequence[PlannedRequest],
    records: Sequence[RequestRecord],
    samples: Sequence[WorkerSample],
) -> list[PhaseSummary]:
    start = run_start(plan, records) if records else 0.0
    end = max((s.t_s for s in samples), default=phases[-1].end_s)
    out: list[PhaseSummary] = []
    for i, phase in enumerate(phases):
        hi = max(end, phase.end_s) + 1e-9 if i == len(phases) - 1 else phase.end_s
        sent = [r for p, r in zip(plan, records) if phase.start_s <= p.at_s < phase.end_s]
        ttft = [
            r.first_token_at - r.sent_at for r in sent if r.status == "ok" and r.first_token_at is not None
        ]
        inside = [s for s in samples if phase.start_s <= s.t_s < hi]
        before = [s for s in samples if s.t_s < phase.start_s]
        base = before[-1] if before else (samples[0] if samples else None)
        busy = [s.busy for s in inside]
        out.append(
            PhaseSummary(
                name=phase.name,
                start_s=phase.start_s,
                end_s=phase.end_s,
                rate_rps=phase.rate_rps,
                requests=len(sent),
                ttft_p50_s=percentile(ttft, 50),
                busy_typical=int(statistics.median_low(busy)) if busy else 0,
                busy_max=max(busy, default=0),
                share_above_one=sum(b > 1 for b in busy) / len(busy) if busy else 0.0,
                queue_max=max((s.queue_len for s in inside), default=0),
                migrations=inside[-1].migrations - base.migrations if inside and base else 0,
                workers_released=inside[-1].workers_released - base.workers_released
                if inside and base
                else 0,
                tokens_per_s=_tokens_in(records, start, phase.start_s, hi) / max(hi - phase.start_s, 1e-9),
            )
        )
    return out


def quiet_ttft_p50(
    phases: Sequence[Phase], plan: Sequence[PlannedRequest], records: Sequence[RequestRecord]
) -> float | None:
    """TTFT p50 over the requests sent in the quiet phases (every phase but the burst)."""
    quiet = [p for p in phases if p.name != "burst"]
    ttft = [
        r.first_token_at - r.sent_at
        for p, r in zip(plan, records)
        if r.status == "ok"
        and r.first_token_at is not None
        and any(q.start_s <= p.at_s < q.end_s for q in quiet)
    ]
    return percentile(ttft, 50)


def check_story(
    config: DemoConfig,
    calibration: Calibration,
    summaries: Sequence[PhaseSummary],
    samples: Sequence[WorkerSample],
    ttft_quiet_p50_s: float | None,
    machine: Machine,
) -> list[Check]:
    quiet, burst, cooldown = summaries
    one = calibration.tokens_per_s
    load = f"load average {machine.load_avg_1m:.1f} on {machine.cores} cores"
    checks: list[Check] = []

    ok = quiet.busy_max >= 1 and quiet.share_above_one <= QUIET_SPILL_SHARE
    reason = ""
    if quiet.busy_max == 0:
        reason = "no request ran in the quiet phase (the workers did not take requests)"
    elif not ok:
        reason = (
            f"the quiet load ({quiet.rate_rps:.1f} req/s, {config.quiet_load:.0%} of one worker) kept more "
            f"than one worker busy {quiet.share_above_one:.0%} of the time: one worker served "
            f"{quiet.tokens_per_s:.0f} tokens/s then, against {one:.0f} tokens/s measured, so the machine "
            f"got slower after the calibration ({load}: other programs compete for the CPU)"
        )
    checks.append(
        Check(
            "one worker while quiet",
            ok,
            f"workers busy {quiet.busy_typical} (max {quiet.busy_max}, >1 for {quiet.share_above_one:.0%})",
            reason,
        )
    )

    ok = burst.busy_max >= 2
    checks.append(
        Check(
            "more workers in the burst",
            ok,
            f"workers busy up to {burst.busy_max} of {config.workers}",
            ""
            if ok
            else (
                f"the burst ({burst.rate_rps:.1f} req/s) never filled one worker's batch of "
                f"{config.max_batch_size}: the calibration overstated one worker ({one:.0f} tokens/s, slices "
                f"spread {calibration.spread:.0%}; {load}); raise --burst-load"
            ),
        )
    )

    moved = burst.migrations + cooldown.migrations
    ok = moved >= 1
    checks.append(
        Check(
            "migrations consolidate the load",
            ok,
            f"{moved} sequences migrated",
            ""
            if ok
            else (
                "no running sequence was moved: the workers emptied on their own before a consolidation "
                f"pass (every {config.consolidation_interval_s:g} s) found a light one to fold into another; "
                "a longer --output-len or a shorter --consolidation-interval-s gives it more chances"
            ),
        )
    )

    window_from = cooldown.end_s - END_WINDOW_SHARE * (cooldown.end_s - cooldown.start_s)
    tail = [s for s in samples if s.t_s >= window_from]
    last = samples[-1] if samples else None
    busy_end = max((s.busy for s in tail), default=0)
    up_end = last.active if last is not None else 0
    ok = bool(tail) and busy_end <= 1 and up_end == 1
    reason = ""
    if not tail:
        reason = "the run ended before the end of the cooldown (no samples there)"
    elif not ok:
        queued = [s.t_s for s in samples if s.t_s >= cooldown.start_s and s.queue_len > 0]
        ratio = burst.tokens_per_s / one if one > 0 else 0.0
        if queued and max(queued) >= window_from - 1.0:
            reason = (
                f"the burst's backlog was still queued {max(queued) - cooldown.start_s:.1f} s into the "
                f"cooldown: the {config.workers} workers served {burst.tokens_per_s:.0f} tokens/s in the "
                f"burst, only {ratio:.1f}x one worker, so this machine is too slow for {config.workers} "
                f"workers at this burst ({load}); lower --burst-load or lengthen --cooldown-s"
            )
        elif busy_end > 1:
            reason = (
                f"{busy_end} workers still ran sequences at the end: the consolidation pass found no "
                "worker whose whole batch fitted into another, and the cooldown ended before they drained; "
                "lengthen --cooldown-s"
            )
        else:
            reason = (
                f"{up_end} workers were still up at the end: idle workers are released after "
                f"--idle-release-s {config.idle_release_s:g} s, which the cooldown did not leave; "
                "lengthen --cooldown-s"
            )
    checks.append(
        Check(
            "release back to one",
            ok,
            f"at the end: workers busy {busy_end}, workers up {up_end}, "
            f"{cooldown.workers_released + burst.workers_released} released",
            reason,
        )
    )

    ok = ttft_quiet_p50_s is not None and ttft_quiet_p50_s < TTFT_QUIET_LIMIT_S
    queue_max = max(quiet.queue_max, cooldown.queue_max)
    shown = "-" if ttft_quiet_p50_s is None else f"{ttft_quiet_p50_s * 1000:.0f} ms"
    checks.append(
        Check(
            "low TTFT while quiet",
            ok,
            f"TTFT p50 {shown} in the quiet phases",
            ""
            if ok
            else (
                f"requests waited in the quiet phases (queue up to {queue_max}): "
                f"the machine served less than the calibration measured ({load})"
            ),
        )
    )
    return checks
