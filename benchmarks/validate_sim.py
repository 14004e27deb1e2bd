"""Validate `lorafleet sim` against the real runtime: the same workload on a CPU Ray fleet of demo-model
workers and through the simulator with the `cpu-demo` profile (or --profile, measured on this machine).

Workload: Poisson quiet / burst (10x by default) / quiet (Punica popularity `skewed` over the demo's
adapters), as `lorafleet demo` sends. Prints the comparison table (markdown), busy workers over time
and the per-phase means; with --out also writes them (report.md, result.json) and the real run's
records (real.json, which --load reads back to re-simulate without the fleet).

    .venv/bin/python benchmarks/validate_sim.py --rate 4 --phase-s 40 --workers 3
    # a machine with a core per worker: profile and fleet with the same torch threads per worker
    lorafleet profile --model DEMO --device cpu --engine max_batch_size=4 --engine cpu_threads=1 --out p.yaml
    python3 benchmarks/validate_sim.py --profile p.yaml --cpu-threads 1 --rate 2.5 --phase-s 30 --out OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lorafleet.bench.runner import RequestRecord, WorkerSample
from lorafleet.bench.workload import phased_workload
from lorafleet.sim.profile import LatencyProfile, load_profile
from lorafleet.sim.profiler import cpu_name
from lorafleet.sim.sim_types import SimRequest
from lorafleet.sim.validate import (
    EVENTS,
    TARGETS,
    FleetSetup,
    RealRun,
    busy_over_time,
    by_phase,
    compare,
    format_comparison,
    format_events,
    format_phases,
    real_run,
    sim_run,
)
from lorafleet.worker.demo_assets import make_demo


def save_real(real: RealRun, path: Path, meta: dict[str, Any]) -> None:
    data = {
        "meta": meta,  # the machine and process figures of the real run, for a report from --load
        "records": [dataclasses.asdict(r) for r in real.records],
        "sent": [dataclasses.asdict(r) for r in real.sent],
        "samples": [dataclasses.asdict(s) for s in real.report.workers_over_time],
        "tokens_per_s": real.report.tokens_per_s,
        "wall_s": real.report.wall_s,
        "completed": real.report.completed,
        "events": real.events,
        "start_s": real.start_s,
    }
    path.write_text(json.dumps(data))


def load_real(path: Path) -> RealRun:
    data = json.loads(path.read_text())
    report = SimpleNamespace(
        tokens_per_s=data["tokens_per_s"],
        wall_s=data["wall_s"],
        completed=data["completed"],
        workers_over_time=[WorkerSample(**s) for s in data["samples"]],
    )
    records = [RequestRecord(**r) for r in data["records"]]
    sent = [SimRequest(**r) for r in data["sent"]]
    return RealRun(report, records, sent, data.get("events", {}), data.get("start_s", []))


def parse_range(flag: str, spec: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SystemExit(f"{flag} {spec!r} must look like MIN:MAX (integers)") from None
    if not 1 <= lo <= hi:
        raise SystemExit(f"{flag} {spec!r}: need 1 <= MIN <= MAX")
    return lo, hi


def machine() -> dict[str, Any]:
    """What the report names the machine by: cores this process may use, CPU model, load now."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def cores_wanted(workers: int, threads: int | None) -> int:
    # Each worker computes on `threads` cores (1 when unset: Ray's OMP_NUM_THREADS). Beside them, the
    # validation process (head + bench client on one event loop) and Ray's GCS and raylet.
    return workers * (threads or 1) + 2


def check_profile(profile: LatencyProfile, args: argparse.Namespace) -> None:
    if profile.engine.max_batch_size != args.batch:
        raise SystemExit(f"--batch {args.batch} differs from the profile's {profile.engine.max_batch_size}")
    command = profile.source.split(";")[0]
    if args.cpu_threads is not None and not re.search(rf"cpu_threads={args.cpu_threads}\b", command):
        raise SystemExit(
            f"--cpu-threads {args.cpu_threads}: the profile was not measured with it (its command: "
            f"{command}); measure it with --engine cpu_threads={args.cpu_threads}"
        )


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def report_text(
    args: argparse.Namespace, plan_len: int, real: RealRun, setup: FleetSetup, profile: LatencyProfile
) -> tuple[str, dict[str, Any]]:
    before, after = args.machine_before, args.machine_after
    wanted = cores_wanted(args.workers, args.cpu_threads)
    short = wanted > (before["usable_cores"] or 0)
    threads = args.cpu_threads if args.cpu_threads is not None else "unset (Ray: 1)"
    lines = [
        f"command: {' '.join(sys.argv)}",
        f"machine: {before['cpu']}, {before['cores']} cores ({before['usable_cores']} usable); "
        f"load average (1/5/15 min) {before['load_avg_1_5_15']} at the start, {after['load_avg_1_5_15']} "
        f"at the end; {before['utc']} UTC",
        f"fleet: up to {args.workers} workers, torch threads per worker {threads}; cores wanted without "
        f"contention {wanted} (workers x threads + 2)"
        + (" -> MORE THAN THIS MACHINE HAS: expect contention" if short else ""),
        f"profile: {profile.name} ({profile.source.split(';')[0]})",
        f"{plan_len} requests; real run {real.report.wall_s:.1f} s, completed {real.report.completed}",
    ]
    if args.head_cpu is not None:
        cpu, wall = args.head_cpu
        lines.append(
            f"head + bench client process: {cpu:.1f} s CPU over {wall:.1f} s (start-up included), "
            f"{cpu / wall * 100:.0f}% of a core"
        )
    lines.append("")
    out: dict[str, Any] = {
        "machine_start": before,
        "machine_end": after,
        "requests": plan_len,
        "head_process_cpu_s_wall_s": args.head_cpu,
    }
    if args.cpu_cores is not None:  # the comparison without the contention model, for reference
        plain = compare(real, sim_run(dataclasses.replace(setup, cpu_cores=None), profile, real.sent))
        lines += ["simulated without a CPU contention model:", format_comparison(plain), ""]
        lines.append(f"simulated with workers sharing {args.cpu_cores} CPU cores:")
        out["without_contention_model"] = plain
    result = sim_run(setup, profile, real.sent)
    rows = compare(real, result)
    met = all(abs(rows[k]["error"]) <= t for k, t in TARGETS.items()) and rows["peak_workers"]["error"] == 0
    lines += [format_comparison(rows), "", f"fidelity targets {'MET' if met else 'NOT met'}", ""]
    lines += ["busy workers over time:", "", "| t (s) | real | simulated |", "|---:|---:|---:|"]
    busy = busy_over_time(real, result, args.phase_s / 4)
    for t, r, s in busy:
        lines.append(f"| {t:.0f} | {_num(r)} | {_num(s)} |")
    phases = by_phase(real, result, [i * args.phase_s for i in range(4)])
    lines += ["", "by phase (arrival time), mean TPOT and TTFT:", "", format_phases(phases)]
    lines += ["", "fleet events:", "", format_events(real, result)]
    starts = ", ".join(f"{x:.2f}" for x in real.start_s) or "none"
    lines.append(f"\nworker start-up (s): real {starts}; the profile's {profile.worker_start_s:.2f}")
    out.update(
        comparison=rows,
        targets_met=met,
        busy_over_time=[{"t_s": t, "real": r, "sim": s} for t, r, s in busy],
        phases=[dataclasses.asdict(p) for p in phases],
        events={"real": real.events, "sim": {name: getattr(result, name) for name in EVENTS}},
    )
    return "\n".join(lines), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu-demo", help="shipped profile name or a profile YAML")
    p.add_argument("--rate", type=float, default=4.0, help="quiet-phase requests/s")
    p.add_argument("--burst-factor", type=float, default=10.0, help="the burst's rate / the quiet rate")
    p.add_argument("--phase-s", type=float, default=40.0)
    p.add_argument("--workers", type=int, default=3, help="max workers")
    p.add_argument("--batch", type=int, default=4, help="engine max_batch_size (match the profile)")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch threads per real worker (EngineConfig.cpu_threads; the profile must use the same)",
    )
    p.add_argument("--idle-release-s", type=float, default=10.0)
    p.add_argument("--prompt-len", default="8:48", help="MIN:MAX prompt tokens (uniform)")
    p.add_argument("--output-len", default="32:160", help="MIN:MAX output tokens (uniform)")
    p.add_argument("--model", type=Path, help="the demo model folder to serve (default: make one)")
    p.add_argument("--cpu-cores", type=float, default=None, help="simulate workers sharing this many cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write report.md, result.json and real.json here")
    p.add_argument("--save", type=Path, help="write the real run's records here (JSON) for --load")
    p.add_argument("--load", type=Path, help="skip the real run: compare against a --save file")
    args = p.parse_args()
    for name in ("rate", "burst_factor", "phase_s"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0")
    if args.workers < 1 or (args.cpu_threads is not None and args.cpu_threads < 1):
        raise SystemExit("--workers and --cpu-threads must be >= 1")
    args.machine_before = machine()
    profile = load_profile(args.profile)
    check_profile(profile, args)
    prompt_len = parse_range("--prompt-len", args.prompt_len)
    output_len = parse_range("--output-len", args.output_len)
    burst = args.burst_factor * args.rate
    phases = [(args.rate, args.phase_s), (burst, args.phase_s), (args.rate, args.phase_s)]
    plan = phased_workload(
        phases, popularity="skewed", prompt_len=prompt_len, output_len=output_len, seed=args.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or Path(tmp) / "demo"
        if args.model is None and args.load is None:
            make_demo(model)
        elif args.model is not None and not (model / "config.json").is_file():
            raise SystemExit(f"--model {model}: no config.json there (make one with `lorafleet make-demo`)")
        setup = FleetSetup(
            str(model),
            str(model / "adapters"),
            max_workers=args.workers,
            max_batch_size=args.batch,
            idle_release_s=args.idle_release_s,
            cpu_cores=args.cpu_cores,
            cpu_threads=args.cpu_threads,
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        real = load_real(args.load) if args.load is not None else real_run(setup, plan, seed=args.seed)
        # The head and the bench client share this process (one event loop): its CPU share says how
        # close that loop came to saturating, which no profile term covers.
        meta = {
            "machine_before": args.machine_before,
            "machine_after": machine(),
            "head_cpu": (time.process_time() - cpu0, time.perf_counter() - wall0),
        }
        if args.load is not None:  # the figures of the machine that ran it
            meta = json.loads(args.load.read_text()).get("meta") or {**meta, "head_cpu": None}
        args.machine_before, args.machine_after = meta["machine_before"], meta["machine_after"]
        args.head_cpu = meta["head_cpu"]
    text, data = report_text(args, len(plan), real, setup, profile)
    print(text)
    if args.save is not None:
        save_real(real, args.save, meta)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text + "\n")
        (args.out / "result.json").write_text(json.dumps(data, indent=1) + "\n")
        if args.load is None:
            save_real(real, args.out / "real.json", meta)


if __name__ == "__main__":
    main()
