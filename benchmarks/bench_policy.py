"""Placement policy throughput: decisions per second with 1,000 workers and 10,000 queued requests.

One `schedule()` pass over a fleet snapshot, on one CPU core (the process pins itself to core 0):
it builds the placement index from the snapshots and places from the head of the FCFS queue until
the queue is empty or its head fits nowhere. Reported: Place decisions / wall time of the pass
(index build included), median of --repeats runs.

Workload: workers with max batch 32, a random current batch (0..24), 2,048 KV blocks of 16 tokens
each with a random share free, 8 resident adapters each out of 1,000; requests with a Zipf-skewed
adapter choice and prompts of 16..1,024 tokens.

    python benchmarks/bench_policy.py [--workers 1000] [--requests 10000] [--policies packing,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

from lorafleet.scheduler.policy import make_placement_policy
from lorafleet.scheduler.policy_types import PendingRequest, Place, RunningSeq, WorkerSnapshot, WorkerState
from lorafleet.scheduler.request_queue import RequestQueue

N_ADAPTERS = 1000


def make_fleet(n_workers: int, rng: random.Random) -> list[WorkerSnapshot]:
    adapters = [f"adapter-{i}" for i in range(N_ADAPTERS)]
    workers = []
    for w in range(n_workers):
        batch = rng.randint(0, 24)
        running = tuple(RunningSeq(f"w{w}-s{i}", rng.choice(adapters), 300, 0.0, 100) for i in range(batch))
        workers.append(
            WorkerSnapshot(
                worker_id=f"w{w}",
                state=WorkerState.ACTIVE,
                running=running,
                max_batch_size=32,
                free_kv_blocks=rng.randint(400, 2048 - 20 * batch),
                total_kv_blocks=2048,
                block_size=16,
                resident_adapters=frozenset(rng.sample(adapters, 8)),
            )
        )
    return workers


def make_requests(n: int, rng: random.Random) -> list[PendingRequest]:
    weights = [1.0 / (k + 1) for k in range(N_ADAPTERS)]
    names = rng.choices([f"adapter-{i}" for i in range(N_ADAPTERS)], weights=weights, k=n)
    return [PendingRequest(f"r{i}", names[i], rng.randint(16, 1024), 128, float(i)) for i in range(n)]


def run_once(policy_name: str, workers, requests) -> tuple[int, float]:
    queue = RequestQueue()
    for r in requests:
        queue.push(r)
    policy = make_placement_policy(policy_name, max_workers=len(workers), seed=0)
    t0 = time.perf_counter()
    decisions = policy.schedule(queue, workers)
    elapsed = time.perf_counter() - t0
    return sum(isinstance(d, Place) for d in decisions), elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", default="packing,least_loaded,round_robin,random")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rng = random.Random(0)
    workers = make_fleet(args.workers, rng)
    requests = make_requests(args.requests, rng)
    results = {}
    for name in args.policies.split(","):
        runs = [run_once(name, workers, requests) for _ in range(args.repeats)]
        placed = runs[0][0]
        secs = statistics.median(t for _, t in runs)
        results[name] = {"placed": placed, "seconds": secs, "decisions_per_s": placed / secs}
    if args.json:
        print(json.dumps({"workers": args.workers, "requests": args.requests, "results": results}))
        return
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}, one core")
    print(f"{args.workers} workers, {args.requests} queued requests, median of {args.repeats} passes")
    print(f"{'policy':<14}{'placed':>8}{'pass ms':>10}{'decisions/s':>14}")
    for name, r in results.items():
        print(f"{name:<14}{r['placed']:>8}{r['seconds'] * 1e3:>10.1f}{r['decisions_per_s']:>14,.0f}")


if __name__ == "__main__":
    main()
