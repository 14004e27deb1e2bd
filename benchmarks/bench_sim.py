"""How fast `lorafleet.sim` runs: simulated requests and GPUs against wall time on one core.

The workload is synthetic (no trace needed): Poisson arrivals at a rate that keeps about `--gpus`
workers busy under the profile (estimated from its full-batch decode step), prompt and output
lengths uniform in the given ranges, skewed adapter popularity over 1,000 adapters. The fleet may grow
to `--gpus` workers, all started at time 0 (min = max); the packing policy with migration (the
heaviest: consolidation every 2 s).

    .venv/bin/python benchmarks/bench_sim.py --requests 1000000 --gpus 1000
    .venv/bin/python benchmarks/bench_sim.py --sweep        # time against requests, then GPUs
"""

from __future__ import annotations

import argparse
import random
import time

from lorafleet.sim.profile import LatencyProfile, load_profile
from lorafleet.sim.simulator import SimConfig, SimRequest, Simulator
from lorafleet.workload import adapter_indices


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
    t0 = time.perf_counter()
    result = Simulator(cfg, profile, reqs).run()
    wall = time.perf_counter() - t0
    done = sum(1 for r in result.records if r.finish is not None)
    return {
        "requests": n,
        "gpus": gpus,
        "peak_gpus": result.peak_gpus,
        "completed": done,
        "sim_s": result.end_s,
        "wall_s": wall,
        "us_per_request": wall / n * 1e6,
        "migrations": result.migrations,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--gpus", type=int, default=100)
    p.add_argument("--prompt-len", default="16:256")
    p.add_argument("--output-len", default="16:256")
    p.add_argument("--placement-interval-s", type=float, default=0.0)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    profile = load_profile(args.profile)
    prompt = tuple(int(x) for x in args.prompt_len.split(":"))
    output = tuple(int(x) for x in args.output_len.split(":"))
    cases = [(args.requests, args.gpus)]
    if args.sweep:
        cases = [
            (n, args.gpus)
            for n in (args.requests // 8, args.requests // 4, args.requests // 2, args.requests)
        ]
        cases += [(args.requests, g) for g in (args.gpus // 8, args.gpus // 4, args.gpus // 2)]
    print("| requests | GPUs (max) | peak GPUs | simulated s | wall s | us / request | migrations |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, g in cases:
        r = run(profile, n, g, prompt, output, args.placement_interval_s)
        assert r["completed"] == n
        cells = (f"{n:,}", g, r["peak_gpus"], f"{r['sim_s']:.0f}", f"{r['wall_s']:.1f}")
        cells += (f"{r['us_per_request']:.1f}", f"{r['migrations']:,}")
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
