"""Check a bench_fleet.py plan in the simulator before spending GPU time on it.

The plan is built exactly as bench_fleet.py builds it (`lorafleet bench`'s own plan builder with
`--phases`, ServeGen tenants), then replayed by `lorafleet.sim` over workers of a measured latency
profile (the shipped H200 7B profile by default) with the engine limits bench_fleet.py's GPU runs
use (batch 32, 32 adapter slots). For each policy, and for one worker alone, it prints what decides
whether the run is worth making: does the burst need the second GPU (one worker alone falls
behind), do the quiet phases fit one, and how many GPU-seconds each policy spends over the same
window.

    python3 benchmarks/fleet_sim_check.py --rates 4,22 --phases-s 10,30,25
    python3 benchmarks/fleet_sim_check.py --rates 4,22 --prefill-token-s 25e-6 --prefill-alone-s 0.0053
    python3 benchmarks/fleet_sim_check.py --rates 0.6,4 --phases-s 4,8,13 --profile cpu-demo --batch 4 \\
        --max-new-tokens 32 --max-prompt-tokens 128 --idle-release-s 3

The simulator's figures are estimates (its profile's prefill cost is a fit, and Ray, the API and
adapter loads are modelled coarsely); they choose rates, they are not results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from fleet_plan import burst_window, shaped_phases
from fleet_run import bench_parser
from fleet_settings import TRACES

from lorafleet.bench.cli_flags import build_plan
from lorafleet.bench.workload import read_azure_trace
from lorafleet.sim.profile import load_profile
from lorafleet.sim.sim_types import SimConfig, SimRequest
from lorafleet.sim.simulator import Simulator


def sim_requests(args: argparse.Namespace, phases: str, max_context: int) -> list[SimRequest]:
    flags = ["--trace", args.trace, "--servegen", args.servegen, "--phases", phases, "--seed", str(args.seed)]
    flags += [
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--max-prompt-tokens",
        str(args.max_prompt_tokens),
    ]
    plan, _ = build_plan(bench_parser().parse_args(flags), max_context, read_azure_trace(args.trace))
    return [SimRequest(p.at_s, f"adapter-{p.adapter_index}", p.prompt_len, p.max_new_tokens) for p in plan]


def window_gpu_seconds(points: list[tuple[float, int]], end: float) -> float:
    """Integral of live workers over [0, end] (the simulator logs each change)."""
    total = 0.0
    for i, (t, live) in enumerate(points):
        hi = min(points[i + 1][0], end) if i + 1 < len(points) else end
        if hi > max(t, 0.0):
            total += live * (hi - max(t, 0.0))
    return total


def _median_ttft(records: list) -> float | None:
    ttft = [r.first_token - r.arrival for r in records if r.first_token is not None]
    return statistics.median(ttft) if ttft else None


def check(args: argparse.Namespace) -> dict:
    quiet, burst = args.rates
    phases = shaped_phases(quiet, burst, args.phases_s)
    b0, b1, plan_s = burst_window(phases)
    profile = load_profile(args.profile)
    engine = dataclasses.replace(profile.engine, max_batch_size=args.batch, max_loras=max(args.batch, 1))
    changes: dict = {"engine": engine}
    # Prefill costs from newer engine measurements than the profile's (e.g. graphs for prefill steps).
    if args.prefill_token_s is not None:
        changes["per_prefill_token_s"] = args.prefill_token_s
    if args.prefill_alone_s is not None and profile.decode_batch[0] == 0:
        changes["decode_base_s"] = (args.prefill_alone_s, *profile.decode_base_s[1:])
    profile = dataclasses.replace(profile, **changes)
    requests = sim_requests(args, phases, engine.max_model_len)
    window = plan_s + args.tail_s
    out: dict = {"phases": phases, "requests": len(requests), "window_s": window, "runs": {}}
    runs = [(p, 2) for p in ("packing", "least_loaded", "round_robin")] + [("packing", 1)]
    for policy, gpus in runs:
        config = SimConfig(
            policy=policy,
            max_gpus=gpus,
            min_gpus=1,
            idle_release_s=args.idle_release_s,
            consolidation_interval_s=1.0,
            seed=args.seed,
        )
        result = Simulator(config, profile, requests).run()
        done = [r for r in result.records if r.finish is not None]
        ttft = sorted(r.first_token - r.arrival for r in done if r.first_token is not None)
        in_burst = [r for r in done if b0 <= r.arrival < b1]
        quiet2 = [r for r in done if r.arrival >= b1]
        two = [t for t, live in result.gpus_over_time if live >= 2]
        back = [t for t, live in result.gpus_over_time if t > b1 and live <= 1]
        out["runs"][policy if gpus == 2 else "one worker"] = {
            "gpu_seconds": window_gpu_seconds(result.gpus_over_time, window),
            "peak_gpus": result.peak_gpus,
            "second_gpu_from_s": two[0] if two else None,
            "back_to_one_after_burst_s": (back[0] - b1) if back and two else None,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
            "burst_ttft_p50_s": statistics.median(r.first_token - r.arrival for r in in_burst)
            if in_burst
            else None,
            "quiet2_ttft_p50_s": statistics.median(r.first_token - r.arrival for r in quiet2)
            if quiet2
            else None,
            "last_finish_s": max((r.finish for r in done), default=None),
            "migrations": result.migrations,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", required=True, help="QUIET,BURST requests/s")
    p.add_argument("--phases-s", default="10,30,25", help="QUIET,BURST,QUIET seconds")
    p.add_argument("--profile", default="h200-llama2-7b", help="shipped profile name or YAML")
    p.add_argument("--batch", type=int, default=32, help="engine max_batch_size (bench_fleet GPU: 32)")
    p.add_argument("--prefill-token-s", type=float, help="override the profile's seconds per prefill token")
    p.add_argument(
        "--prefill-alone-s", type=float, help="override the base seconds of a step with no decode rows"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--idle-release-s", type=float, default=5.0)
    p.add_argument("--tail-s", type=float, default=5.0)
    p.add_argument("--trace", default=str(TRACES / "azure_llm_2023_conv.csv"))
    p.add_argument("--servegen", default=str(TRACES / "servegen_m_large"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        args.rates = tuple(float(x) for x in args.rates.split(","))
        args.phases_s = tuple(float(x) for x in args.phases_s.split(","))
        if len(args.rates) != 2 or len(args.phases_s) != 3:
            raise ValueError
    except ValueError:
        print(
            "fleet_sim_check: error: --rates takes QUIET,BURST and --phases-s three seconds", file=sys.stderr
        )
        return 2
    if not Path(args.trace).exists():
        print(f"fleet_sim_check: error: no trace at {args.trace}", file=sys.stderr)
        return 2
    out = check(args)
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"phases {out['phases']}: {out['requests']} requests; GPU-seconds over [0, {out['window_s']:.0f} s]"
    )
    for name, r in out["runs"].items():
        fmt = {k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in r.items()}
        print(f"  {name:<13} " + "  ".join(f"{k}={v}" for k, v in fmt.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
