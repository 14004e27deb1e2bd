"""How fast `lorafleet.sim` runs: simulated requests and GPUs against wall time on one core.

The workload is synthetic (no trace needed): Poisson arrivals at a rate that keeps about `--gpus`
workers busy under the profile (estimated from its full-batch decode step), prompt and output
lengths uniform in the given ranges, skewed adapter popularity over 1,000 adapters. The fleet may grow
to `--gpus` workers, all started at time 0 (min = max); the packing policy with migration (the
heaviest: consolidation every 2 s).

    .venv/bin/python benchmarks/bench_sim.py --requests 1000000 --gpus 1000 --placement-interval-s 0.01
    .venv/bin/python benchmarks/bench_sim.py --requests 10000,100000 --gpus 10,100   # every pair
    .venv/bin/python benchmarks/bench_sim.py --sweep --placement-interval-s 0.01
        # requests 10k, 100k, 1M at 1,000 GPUs, then GPUs 10, 100, 1,000 at 100k requests

Each row gives the wall time of `Simulator.run` and its CPU time (the process's), and the load
average when the case started and ended: the machine is shared, so wall time alone can mislead.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

from lorafleet.bench.workload import adapter_indices
from lorafleet.sim.profile import LatencyProfile, load_profile
from lorafleet.sim.sim_types import SimConfig, SimRequest
from lorafleet.sim.simulator import Simulator


def workload(
    profile: LatencyProfile,
    n: int,
    gpus: int,
    prompt: tuple[int, int],
    output: tuple[int, int],
    seed: int = 0,
) -> list[SimRequest]:
    e = profile.engine
    mean_out = sum(output) / 2
    step = profile.step_s(e.max_batch_size, 0, e.max_batch_size * (sum(prompt) / 2 + mean_out / 2), 4)
    per_gpu = e.max_batch_size / (mean_out * step) * 0.7  # requests/s one worker sustains, with headroom
    rate = per_gpu * gpus
    rng = random.Random(seed)
    adapters = adapter_indices("skewed", n, rng, 1000)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append(SimRequest(t, f"adapter-{adapters[i]}", rng.randint(*prompt), rng.randint(*output)))
    return out


def run(
    profile: LatencyProfile,
    n: int,
    gpus: int,
    prompt: tuple[int, int],
    output: tuple[int, int],
    interval: float,
) -> dict:
    reqs = workload(profile, n, gpus, prompt, output)
    # All GPUs up from the start: the fleet grows one worker per start-up time, so a cold start would
    # spend most of a short run ramping up instead of measuring a fleet of this size.
    cfg = SimConfig(policy="packing", max_gpus=gpus, min_gpus=gpus, placement_interval_s=interval)
    t0, c0 = time.perf_counter(), time.process_time()
    result = Simulator(cfg, profile, reqs).run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    done = sum(1 for r in result.records if r.finish is not None)
    return {
        "requests": n,
        "gpus": gpus,
        "peak_gpus": result.peak_gpus,
        "completed": done,
        "sim_s": result.end_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "migrations": result.migrations,
    }


def _counts(text: str, name: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",")]
    except ValueError:
        raise SystemExit(
            f"bench_sim: --{name} must be a comma-separated list of integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise SystemExit(f"bench_sim: --{name} values must be >= 1, got {text!r}")
    return values


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--requests", default="100000", help="count, or comma-separated counts")
    p.add_argument("--gpus", default="100", help="count, or comma-separated counts")
    p.add_argument("--prompt-len", default="16:256")
    p.add_argument("--output-len", default="16:256")
    p.add_argument("--placement-interval-s", type=float, default=0.0)
    p.add_argument("--sweep", action="store_true", help="the scaling table of docs/simulator.md")
    args = p.parse_args()
    profile = load_profile(args.profile)
    prompt = tuple(int(x) for x in args.prompt_len.split(":"))
    output = tuple(int(x) for x in args.output_len.split(":"))
    if args.sweep:
        cases = [(n, 1000) for n in (10_000, 100_000, 1_000_000)] + [(100_000, g) for g in (10, 100, 1000)]
    else:
        cases = [(n, g) for n in _counts(args.requests, "requests") for g in _counts(args.gpus, "gpus")]
    print(f"# {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, python {platform.python_version()}, "
          f"placement interval {args.placement_interval_s} s")  # fmt: skip
    columns = ("requests", "GPUs", "peak GPUs", "simulated s", "wall s", "CPU s", "µs / request (CPU)")
    columns += ("migrations", "load avg start / end")
    print("| " + " | ".join(columns) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, g in cases:
        start_load = _load()
        r = run(profile, n, g, prompt, output, args.placement_interval_s)
        if r["completed"] != n:
            raise SystemExit(f"bench_sim: only {r['completed']} of {n} requests completed")
        cells = (f"{n:,}", f"{g:,}", f"{r['peak_gpus']:,}", f"{r['sim_s']:,.0f}", f"{r['wall_s']:.1f}")
        cells += (f"{r['cpu_s']:.1f}", f"{r['cpu_s'] / n * 1e6:.1f}", f"{r['migrations']:,}")
        cells += (f"{start_load} / {_load()}",)
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
