"""Runtime overhead on the CPU: 2 workers through the Ray runtime against the same engines in-process.

Workload: --requests greedy requests (8-token prompts, --max-new-tokens each, adapters cycling over
the demo adapters and the base model), split evenly over two engines of --max-batch-size. Reported:
- in-process, sequential: both engines in this process, stepped in turn (one core);
- in-process, ideal parallel: each engine timed alone in this process; the two halves could run
  side by side on two cores, so total tokens / the slower half's time is the best two workers can do;
- runtime: the same requests through `Fleet` with 2 WorkerActors (local Ray), wall time from the
  first submission to the last final delta, and the time from a token leaving its worker's step to
  its hand-over to the caller (p50/p99 over every delta).
Every engine uses one torch thread (as Ray gives a worker actor with no CPU reservation). Medians of
--repeats runs; the CPU seconds of the head and of each worker in the last runtime run are printed
too (psutil), since on a 2-core machine the head competes with the workers. The runtime outputs are
checked against the in-process ones.

    python benchmarks/bench_runtime.py [--model DIR] [--requests 32] [--max-new-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorafleet.scheduler.fleet import Fleet
from lorafleet.scheduler.fleet_config import FleetConfig
from lorafleet.worker import Engine, Request, SamplingParams
from lorafleet.worker.demo_assets import make_demo


def workload(n: int, max_new: int, adapters: list[str]) -> list[Request]:
    names = [*adapters, None]
    sampling = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    return [
        Request(f"b{i}", tuple((7 * i + k) % 300 + 3 for k in range(8)), names[i % len(names)], sampling)
        for i in range(n)
    ]


def make_engine(model_dir: Path, adapters: dict[str, Path], max_batch: int) -> Engine:
    engine = Engine.from_pretrained(model_dir, max_batch_size=max_batch)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def drive(engines: list[Engine], shards: list[list[Request]]) -> tuple[float, dict[str, list[int]]]:
    outputs: dict[str, list[int]] = {}
    for engine, shard in zip(engines, shards):
        for r in shard:
            engine.add_request(r)
            outputs[r.request_id] = []
    t0 = time.perf_counter()
    while any(e.has_unfinished() for e in engines):
        for e in engines:
            if e.has_unfinished():
                for d in e.step():
                    outputs[d.request_id].extend(d.new_token_ids)
    return time.perf_counter() - t0, outputs


async def through_runtime(
    model_dir: Path, adapters: dict[str, Path], requests: list[Request], max_batch: int, repeats: int
):
    config = FleetConfig(
        model_dir=str(model_dir),
        min_workers=2,
        max_workers=2,
        engine={"max_batch_size": max_batch},
        consolidation_interval_s=3600.0,  # measure the data path, not migrations
    )
    fleet = await Fleet.start(config)
    try:
        for name, path in adapters.items():
            fleet.register_adapter(name, str(path), confined=False)
        workers = [w.info.pid for w in fleet._runtime.live_workers() if w.info is not None]

        async def run(request: Request) -> list[int]:
            tokens: list[int] = []
            async for delta in fleet.generate(request):
                tokens.extend(delta.new_token_ids)
            return tokens

        await asyncio.gather(*(run(_renamed(r, "warm")) for r in requests))  # adapter loads, allocations
        walls, cpu = [], {}
        for k in range(repeats):
            fleet.delivery_latencies.clear()
            cpu0 = _cpu_seconds(workers)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(run(_renamed(r, f"r{k}-") if k else r) for r in requests))
            walls.append(time.perf_counter() - t0)
            cpu = {who: round(after - cpu0[who], 3) for who, after in _cpu_seconds(workers).items()}
        latencies = sorted(fleet.delivery_latencies)  # of the last repetition
    finally:
        await fleet.shutdown()
    return statistics.median(walls), {r.request_id: t for r, t in zip(requests, results)}, latencies, cpu


def _cpu_seconds(worker_pids: list[int]) -> dict[str, float]:
    """CPU time of the head (this process) and of each worker process, where psutil is available."""
    head = resource.getrusage(resource.RUSAGE_SELF)
    out = {"head": head.ru_utime + head.ru_stime}
    try:
        import psutil
    except ImportError:
        return out
    for i, pid in enumerate(worker_pids):
        t = psutil.Process(pid).cpu_times()
        out[f"worker{i}"] = t.user + t.system
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model dir with adapters/ (default: a fresh demo model)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_demo(Path(tmp) / "demo", num_adapters=4).model_dir
        adapters = {p.name: p for p in sorted((Path(model_dir) / "adapters").iterdir())}
        requests = workload(args.requests, args.max_new_tokens, sorted(adapters))
        shards = [requests[0::2], requests[1::2]]
        engines = [make_engine(Path(model_dir), adapters, args.max_batch_size) for _ in range(2)]
        drive(engines, [[_renamed(r, "warm") for r in sh] for sh in shards])  # adapter loads, allocations
        seq_times, alone_times = [], []
        for k in range(args.repeats):
            t, out = drive(engines, [[_renamed(r, f"s{k}-") if k else r for r in sh] for sh in shards])
            seq_times.append(t)
            if k == 0:
                reference = out
            halves = [drive([e], [[_renamed(r, f"a{k}-") for r in sh]])[0] for e, sh in zip(engines, shards)]
            alone_times.append(max(halves))
        seq_time, alone = statistics.median(seq_times), statistics.median(alone_times)
        del engines
        rt_wall, rt_out, lat, cpu = asyncio.run(
            through_runtime(Path(model_dir), adapters, requests, args.max_batch_size, args.repeats)
        )
    total = args.requests * args.max_new_tokens
    if rt_out != reference:
        raise SystemExit("runtime outputs differ from the in-process engines")
    result = {
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "max_batch_size": args.max_batch_size,
        "in_process_sequential_tok_s": total / seq_time,
        "in_process_ideal_parallel_tok_s": total / alone,
        "runtime_tok_s": total / rt_wall,
        "delivery_latency_ms_p50": 1e3 * statistics.median(lat),
        "delivery_latency_ms_p99": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "deltas_measured": len(lat),
        "runtime_cpu_seconds_last_run": cpu,
        "runtime_wall_seconds": rt_wall,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{platform.machine()}, python {platform.python_version()}, torch threads per engine: 1")
    print(
        f"{args.requests} requests x {args.max_new_tokens} tokens, 2 engines of batch {args.max_batch_size}"
    )
    for key in ("in_process_sequential_tok_s", "in_process_ideal_parallel_tok_s", "runtime_tok_s"):
        print(f"  {key:<34}{result[key]:>10.0f}")
    print(f"  CPU seconds in the last runtime run ({rt_wall:.2f} s median wall): {cpu}")
    print(
        f"  delivery latency p50 {result['delivery_latency_ms_p50']:.2f} ms, "
        f"p99 {result['delivery_latency_ms_p99']:.2f} ms over {len(lat)} deltas"
    )


def _renamed(r: Request, prefix: str) -> Request:
    return Request(f"{prefix}{r.request_id}", r.prompt_token_ids, r.adapter, r.sampling)


if __name__ == "__main__":
    main()
