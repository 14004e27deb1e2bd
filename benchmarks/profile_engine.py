"""Where an engine step's time goes (GPU): prefill steps as graphs and eagerly, and the kernels of
graph-replayed decode steps.

1. Prefill: one sequence whose next step is a prefill of N prompt tokens (backbone, or with an
   adapter slot), timed without overlap (warm: the first repetitions compile the kernels' variants)
   as the engine runs it (a graph of its row bucket) and eagerly (the graphs for prefill switched
   off); the eager step is also profiled with cProfile (host functions by own time) and with
   torch.profiler (GPU busy time and launches per step).
2. Decode kernels: a batch installed into the paged cache (as bench_engine.py does) and 3 replayed
   steps under torch.profiler, GPU time summed by kernel name per step.

    python3 benchmarks/profile_engine.py --out DIR [--shape llama2-7b] [--prefill-tokens 16,512,1025]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_engine import profile_steps
from engine_shapes import (
    fill_pool,
    install_decode_batch,
    make_engine,
    model_config,
    popularity_slots,
    random_model,
    remove_batch,
)

from lorafleet.worker import SamplingParams
from lorafleet.worker.engine import Engine
from lorafleet.worker.sequence import SeqStatus, Sequence
from lorafleet.worker.types import Request


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install_prefill(engine: Engine, tokens: int, slot: int, tag: str, rng: random.Random) -> str:
    """One running sequence whose next step is a prefill of ``tokens`` prompt tokens."""
    vocab = engine.model_config.vocab_size
    sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    seq = Sequence(
        Request(tag, tuple(rng.randrange(3, vocab) for _ in range(tokens)), None, sp), next(engine._arrivals)
    )
    seq.block_table = engine.allocator.allocate(engine.allocator.blocks_needed(tokens + 8))
    seq.lora_slot = slot
    seq.status = SeqStatus.RUNNING
    engine.scheduler.running.append(seq)
    engine._seqs[tag] = seq
    return tag


def kernel_table(fn, n: int) -> list[tuple[str, int, float]]:
    """(kernel name, calls per step, GPU µs per step), longest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    calls: dict[str, int] = defaultdict(int)
    us: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            name = e.name[:90]
            calls[name] += 1
            us[name] += e.time_range.end - e.time_range.start
    rows = [(k, round(calls[k] / n), us[k] / n) for k in us]
    return sorted(rows, key=lambda r: -r[2])


def time_prefill(engine: Engine, tokens: int, slot: int, tag: str, rng: random.Random) -> list[float]:
    times = []
    for rep in range(5):
        rid = install_prefill(engine, tokens, slot, f"{tag}-{rep}", rng)
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        engine.abort(rid)
    return times


def prefill_case(engine: Engine, tokens: int, slot: int, out: Path, rng: random.Random) -> dict:
    """A prefill step replayed as a graph of its row bucket, and the same step run eagerly."""
    tag = f"prefill-{tokens}-{slot}"
    runner = engine.runner
    buckets = runner.token_sizes
    times = time_prefill(engine, tokens, slot, tag, rng)
    graphed = runner.num_mixed_graph_steps
    runner.token_sizes = ()  # every step with prefill rows runs eagerly
    eager_times = time_prefill(engine, tokens, slot, tag + "-eager", rng)
    rid = install_prefill(engine, tokens, slot, f"{tag}-prof", rng)
    prof = cProfile.Profile()
    sync()
    prof.enable()
    engine.step()
    sync()
    prof.disable()
    engine.abort(rid)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    (out / f"cprofile-eager-{tag}.txt").write_text(text.getvalue())
    busy = {"gpu_busy_us": float("nan"), "host_launches": float("nan"), "gpu_ops": float("nan")}
    if torch.cuda.is_available():
        rid = install_prefill(engine, tokens, slot, f"{tag}-torchprof", rng)
        busy = profile_steps(engine.step, 1)
        engine.abort(rid)
    runner.token_sizes = buckets
    row = {
        "case": tag,
        "tokens": tokens,
        "lora": slot >= 0,
        "graph_steps": graphed,
        "step_ms_graph_warm": statistics.median(times[2:]) * 1e3,
        "step_ms_graph_all": [round(t * 1e3, 2) for t in times],
        "step_ms_eager_warm": statistics.median(eager_times[2:]) * 1e3,
        "step_ms_eager_all": [round(t * 1e3, 2) for t in eager_times],
        "eager_gpu_busy_ms": busy["gpu_busy_us"] / 1e3,
        "eager_host_launches": busy["host_launches"],
    }
    print(json.dumps(row), flush=True)
    return row


def decode_case(engine: Engine, batch: int, context: int, popularity: str, out: Path) -> dict:
    rng = random.Random(0)
    slots = popularity_slots(popularity, batch, engine.lora_pool.n_slots, rng)
    ids = install_decode_batch(engine, slots, context, rng)
    for _ in range(3):
        engine.step()
    table = kernel_table(engine.step, 3)
    remove_batch(engine, ids)
    total = sum(r[2] for r in table)
    lines = [f"b{batch} c{context} {popularity}: GPU µs per step {total:.0f}", ""]
    lines += ["| kernel | calls/step | µs/step | µs/call |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {c} | {u:.1f} | {u / max(c, 1):.2f} |" for k, c, u in table[:40]]
    (out / f"kernels-b{batch}-c{context}-{popularity}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14]), flush=True)
    return {"case": f"decode b{batch} c{context} {popularity}", "gpu_us": total, "kernels": table[:60]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--prefill-tokens", default="16,512,1025")
    p.add_argument("--decode", default="64:256", help="batch:context pairs for the kernel tables")
    p.add_argument("--popularities", default="backbone,identical,distinct")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the prefill part (no kernel tables)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = model_config(args.shape)
    model = random_model(
        config, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32, device=args.device
    )
    engine = make_engine(
        model,
        config,
        max_batch_size=64,
        max_loras=128,
        max_lora_rank=16,
        max_model_len=min(2048, config.max_position_embeddings),
        host_cache_bytes=1 << 30,
        graph_capture="start",  # the 512- and 1,025-row prefill graphs exist from the start
    )
    fill_pool(engine.lora_pool, [16])
    engine._overlap = False  # each step timed on its own
    rng = random.Random(0)
    rows = []
    for tokens in (int(t) for t in args.prefill_tokens.split(",")):
        for slot in (-1, 0):
            rows.append(prefill_case(engine, tokens, slot, args.out, rng))
    engine._overlap = args.device == "cuda"
    for pair in args.decode.split(",") if args.device == "cuda" else []:
        batch, context = (int(v) for v in pair.split(":"))
        for pop in args.popularities.split(","):
            rows.append(decode_case(engine, batch, context, pop, args.out))
    (args.out / "profile_engine.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
