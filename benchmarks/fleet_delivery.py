"""What token delivery through Ray adds over the engine driven in-process, on the same device.

Workload (as benchmarks/bench_runtime.py's): N greedy requests with 8-token prompts and
`new_tokens` tokens each, alternating between one adapter and the base model, all sent at once.
- Through the fleet: the requests go to bench_fleet.py's two-worker migration fleet (an in-process
  `Fleet`, Ray workers on their own GPUs), which places them over its two workers; each token is
  stamped when it reaches the caller's stream. The fleet also records, per delta, the time from its
  worker's step returning to its hand-over to the caller (`Fleet.delivery_latencies`).
- In-process: one `Engine` in this process on the same device kind, model and engine settings,
  fed each worker's share of the requests as one batch (the batch that worker ran), stepped in a
  loop; each token is stamped when `step()` returns it.
Inter-token latency (ITL) = the time between consecutive tokens of one request as its caller sees
them (a delta carrying k tokens gives k-1 zeros after its gap). Both sides run the workload once to
warm up (kernel compiles, the adapter load, allocations), then once timed. The target: ITL p50
through the fleet at most 2 ms above the in-process engine's.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorafleet.scheduler.fleet import Fleet
from lorafleet.worker.types import Request, SamplingParams

ADAPTER = "delivery"


def workload(n: int, new_tokens: int, prefix: str) -> list[Request]:
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [
        Request(
            f"{prefix}{i}", tuple((7 * i + k) % 300 + 3 for k in range(8)), (ADAPTER, None)[i % 2], sampling
        )
        for i in range(n)
    ]


def gaps(stamps: Iterable[tuple[float, int]]) -> list[float]:
    """Inter-token gaps of one request from its (arrival time, tokens) deltas, in seconds."""
    out: list[float] = []
    last: float | None = None
    for t, n in stamps:
        if n <= 0:
            continue
        if last is not None:
            out.append(t - last)
        out.extend([0.0] * (n - 1))
        last = t
    return out


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "n": 0}
    ordered = sorted(values)
    return {
        "p50_ms": 1e3 * statistics.median(ordered),
        "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_ms": 1e3 * statistics.fmean(ordered),
        "n": len(ordered),
    }


async def through_fleet(fleet: Fleet, adapter_dir: str, n: int, new_tokens: int) -> dict[str, Any]:
    """ITL through the fleet, and which worker ran which request (the in-process side's batches)."""
    fleet.register_adapter(ADAPTER, adapter_dir, confined=False)
    rt = fleet._runtime  # read-only: which worker owns a request, for the in-process batches

    async def one(request: Request, owners: dict[str, str]) -> list[tuple[float, int]]:
        stamps: list[tuple[float, int]] = []
        async for delta in fleet.generate(request):
            stamps.append((time.perf_counter(), len(delta.new_token_ids)))
            tracked = rt.requests.get(request.request_id)
            if tracked is not None and tracked.owner is not None:
                owners[request.request_id] = tracked.owner
        return stamps

    await asyncio.gather(*(one(r, {}) for r in workload(n, new_tokens, "warm-")))
    fleet.delivery_latencies.clear()
    owners: dict[str, str] = {}
    requests = workload(n, new_tokens, "d")
    start = time.perf_counter()
    results = await asyncio.gather(*(one(r, owners) for r in requests))
    wall = time.perf_counter() - start
    shards: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        shards.setdefault(owners.get(r.request_id, "?"), []).append(i)
    return {
        "itl": percentiles([g for stamps in results for g in gaps(stamps)]),
        "delivery": percentiles(list(fleet.delivery_latencies)),
        "tokens_per_s": n * new_tokens / wall,
        "shards": sorted(shards.values()),
    }


def in_process(
    *,
    model_dir: str,
    adapter_dir: str,
    device: str,
    dtype: str,
    engine: dict[str, Any],
    n: int,
    new_tokens: int,
    shards: list[list[int]],
) -> dict[str, Any]:
    """ITL of one Engine in this process, running each of the fleet's worker batches in turn."""
    import torch

    from lorafleet.worker import Engine

    if device == "cuda":
        _wait_for_free_gpu(torch)
    else:
        # One torch thread, as Ray gives a CPU worker actor without a CPU reservation.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    eng = Engine.from_pretrained(Path(model_dir), device=device, dtype=dtype, **engine)
    try:
        eng.add_adapter(ADAPTER, adapter_dir)
        all_gaps: list[float] = []
        walls = 0.0
        for prefix in ("warm-", "d"):
            requests = workload(n, new_tokens, prefix)
            timed: list[float] = []
            for shard in shards:
                batch = [requests[i] for i in shard]
                stamps: dict[str, list[tuple[float, int]]] = {r.request_id: [] for r in batch}
                for r in batch:
                    eng.add_request(r)
                start = time.perf_counter()
                while eng.has_unfinished():
                    deltas = eng.step()
                    now = time.perf_counter()
                    for d in deltas:
                        stamps[d.request_id].append((now, len(d.new_token_ids)))
                if prefix == "d":
                    walls += time.perf_counter() - start
                timed += [g for s in stamps.values() for g in gaps(s)]
            all_gaps = timed
        return {"itl": percentiles(all_gaps), "tokens_per_s": n * new_tokens / walls if walls else None}
    finally:
        del eng
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        else:
            torch.set_num_threads(threads)


def _wait_for_free_gpu(torch: Any, timeout_s: float = 60.0) -> None:
    """The fleet's workers have exited, but their memory may take a moment to come back."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info(0)
        if free > 0.8 * total:
            return
        time.sleep(0.5)


def summary(fleet_side: dict[str, Any], engine_side: dict[str, Any] | None, target_ms: float = 2.0) -> dict:
    out = {"fleet": fleet_side, "in_process": engine_side, "target_ms": target_ms}
    if engine_side and fleet_side["itl"]["p50_ms"] is not None and engine_side["itl"]["p50_ms"] is not None:
        out["added_p50_ms"] = fleet_side["itl"]["p50_ms"] - engine_side["itl"]["p50_ms"]
        out["added_p99_ms"] = fleet_side["itl"]["p99_ms"] - engine_side["itl"]["p99_ms"]
        out["met"] = out["added_p50_ms"] < target_ms
    return out
