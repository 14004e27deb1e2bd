"""Validate `lorafleet sim` against the real runtime: the same workload on a CPU Ray fleet of demo-model
workers and through the simulator with the `cpu-demo` profile (or --profile, measured on this machine).

Workload: Poisson quiet / 10x burst / quiet (Punica popularity `skewed` over the demo's adapters),
as `lorafleet demo` sends. Prints the comparison table (markdown) and busy workers over time.

    .venv/bin/python benchmarks/validate_sim.py --rate 4 --phase-s 40 --workers 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

from lorafleet.bench.runner import RequestRecord, WorkerSample
from lorafleet.bench.workload import phased_workload
from lorafleet.sim.profile import load_profile
from lorafleet.sim.simulator import SimRequest
from lorafleet.sim.validate import (
    FleetSetup,
    RealRun,
    busy_over_time,
    compare,
    format_comparison,
    real_run,
    sim_run,
)
from lorafleet.worker.demo_assets import make_demo


def save_real(real: RealRun, path: Path) -> None:
    data = {
        "records": [dataclasses.asdict(r) for r in real.records],
        "sent": [dataclasses.asdict(r) for r in real.sent],
        "samples": [dataclasses.asdict(s) for s in real.report.workers_over_time],
        "tokens_per_s": real.report.tokens_per_s,
        "wall_s": real.report.wall_s,
        "completed": real.report.completed,
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
    return RealRun(report, records, [SimRequest(**r) for r in data["sent"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--rate", type=float, default=4.0, help="quiet-phase requests/s (the burst is 10x)")
    p.add_argument("--phase-s", type=float, default=40.0)
    p.add_argument("--workers", type=int, default=3, help="max workers")
    p.add_argument("--batch", type=int, default=4, help="engine max_batch_size (match the profile)")
    p.add_argument("--idle-release-s", type=float, default=10.0)
    p.add_argument("--output-len", default="32:160")
    p.add_argument("--cpu-cores", type=float, default=None, help="simulate workers sharing this many cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, help="write the real run's records here (JSON) for --load")
    p.add_argument("--load", type=Path, help="skip the real run: compare against a --save file")
    args = p.parse_args()
    profile = load_profile(args.profile)
    if profile.engine.max_batch_size != args.batch:
        raise SystemExit(f"--batch {args.batch} differs from the profile's {profile.engine.max_batch_size}")
    lo, hi = (int(x) for x in args.output_len.split(":"))
    phases = [(args.rate, args.phase_s), (10 * args.rate, args.phase_s), (args.rate, args.phase_s)]
    plan = phased_workload(
        phases, popularity="skewed", prompt_len=(8, 48), output_len=(lo, hi), seed=args.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        setup = FleetSetup(
            str(Path(tmp) / "demo"),
            str(Path(tmp) / "demo" / "adapters"),
            max_workers=args.workers,
            max_batch_size=args.batch,
            idle_release_s=args.idle_release_s,
            cpu_cores=args.cpu_cores,
        )
        if args.load is not None:
            real = load_real(args.load)
        else:
            make_demo(Path(tmp) / "demo")
            real = real_run(setup, plan, seed=args.seed)
        if args.save is not None:
            save_real(real, args.save)
    print(f"{len(plan)} requests; real run {real.report.wall_s:.1f} s, completed {real.report.completed}")
    if args.cpu_cores is not None:  # the comparison without the contention model, for reference
        plain = sim_run(dataclasses.replace(setup, cpu_cores=None), profile, real.sent)
        print("\nsimulated without a CPU contention model:")
        print(format_comparison(compare(real, plain)))
        print(f"\nsimulated with workers sharing {args.cpu_cores} CPU cores:")
    result = sim_run(setup, profile, real.sent)
    print(format_comparison(compare(real, result)))
    print("\n| t (s) | busy workers real | simulated |\n|---:|---:|---:|")
    for t, r, s in busy_over_time(real, result, args.phase_s / 4):
        print(
            f"| {t:.0f} | {'-' if math.isnan(r) else f'{r:.2f}'} | {'-' if math.isnan(s) else f'{s:.2f}'} |"
        )


if __name__ == "__main__":
    main()
