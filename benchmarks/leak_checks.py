"""The two leaks the soak found (issue 13), each measured in isolation, with and without its fix.

- Ray task events: the resident memory of a private local Ray's GCS after N calls to an actor
  method, with task events on (Ray's default) and off (`enable_task_events=False`, as lorafleet's
  worker actors are created).
- safetensors' `get_tensor`: resident memory and traced Python memory kept per call after reading
  every tensor of a demo adapter N times, through `safe_open(...).get_tensor` and through
  `lorafleet.worker.mapped_tensors.MappedTensors`.

Prints one JSON object.

    python benchmarks/leak_checks.py                      # both, default sizes (~1 minute)
    python benchmarks/leak_checks.py --calls 20000 --reads 5000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from soak_memory import tree_rss_by_role

from lorafleet.worker.memory_probe import rss_mb


class _Echo:
    async def f(self, x: int) -> int:
        return x


def gcs_growth(calls: int, task_events: bool) -> dict:
    """MB the GCS grew by over `calls` actor calls (in rounds of 5,000, each flushed to the GCS)."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        options = {} if task_events else {"enable_task_events": False}
        actor = ray.remote(_Echo).options(num_cpus=0, **options).remote()
        ray.get(actor.f.remote(0))
        time.sleep(3)  # Ray's start-up settles
        before = tree_rss_by_role(os.getpid())["gcs"]
        done = 0
        while done < calls:
            n = min(5000, calls - done)
            ray.get([actor.f.remote(i) for i in range(n)])
            done += n
            time.sleep(2)  # task events reach the GCS about once a second
        after = tree_rss_by_role(os.getpid())["gcs"]
    finally:
        ray.shutdown()
    return {
        "calls": calls,
        "gcs_mb_before": round(before, 1),
        "gcs_mb_per_1000_calls": round(1000 * (after - before) / calls, 3),
    }


def read_growth(adapter_dir: Path, reads: int, mapped: bool) -> dict:
    """Bytes kept per tensor read (RSS and traced Python memory) over `reads` reads of every tensor."""
    from safetensors import safe_open

    from lorafleet.worker.mapped_tensors import MappedTensors

    weights = str(adapter_dir / "adapter_model.safetensors")
    with safe_open(weights, framework="pt") as f:
        keys = list(f.keys())

    def read_all() -> None:
        if mapped:
            tensors = MappedTensors(weights)
            for key in keys:
                tensors.get_tensor(key)
        else:
            with safe_open(weights, framework="pt", device="cpu") as f:
                for key in keys:
                    f.get_tensor(key)

    for _ in range(200):  # warm-up: caches and the allocator settle
        read_all()
    gc.collect()
    rss0 = rss_mb()
    tracemalloc.start()
    for _ in range(reads):
        read_all()
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    calls = reads * len(keys)
    return {
        "tensor_reads": calls,
        "rss_bytes_per_read": round((rss_mb() - rss0) * 2**20 / calls, 1),
        "traced_bytes_per_read": round(traced / calls, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="actor calls per GCS measurement")
    parser.add_argument("--reads", type=int, default=5000, help="reads of the whole adapter per case")
    args = parser.parse_args()
    from lorafleet.worker.demo_assets import make_demo

    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_demo(Path(tmp) / "demo", num_adapters=1).adapters["adapter-0"]
        result = {
            "safetensors_get_tensor": read_growth(Path(adapter), args.reads, mapped=False),
            "mapped_tensors": read_growth(Path(adapter), args.reads, mapped=True),
        }
    result["gcs_task_events_on"] = gcs_growth(args.calls, task_events=True)
    result["gcs_task_events_off"] = gcs_growth(args.calls, task_events=False)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
