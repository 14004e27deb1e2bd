"""The worker engine's decode step and end-to-end serving on a GPU, against the memory roofline.

For each model shape (random bf16 weights; Llama-2-7B MHA and Llama-3-8B GQA):
1. A plain-PyTorch reference decode step (decode_reference.py: static KV + SDPA + cuBLAS, one CUDA
   graph), with and without ``add_lora_slices`` over distinct adapters, timed by CUDA events.
2. The engine's decode step (``Engine.step``: scheduler, packed metadata, CUDA-graph replay of the
   paged forward, sampling, stop checks) over batch x context x popularity. Batches are installed
   straight into the paged cache (engine_shapes.py). Each row reports the median wall time of a
   step, the roofline = (weight bytes + KV bytes read + adapter bytes of the distinct slots) / the
   device-to-device copy bandwidth measured in this run, the share of it reached, the GPU-busy
   share of the step (union of GPU activity under torch.profiler / the step's wall time) and the
   GPU operations and host launch calls per step. Overlapped stepping is on (as the engine runs on
   CUDA by default), so a step's wall time is the interval between steps in steady state;
   ``--compare-sync`` also times each case with it off, ``--sync`` turns it off throughout.
3. End to end through ``Engine.add_request`` / ``step`` with real PEFT adapter directories (1,000
   registered names over a few files): a fixed shape (batch 64, prompt 128, 32 new tokens, distinct
   adapters) and Punica's workload (lognormal prompt and output lengths, skewed adapters).
4. transformers + PEFT mixed-adapter generation (batch 32 and 64, prompt 128) as the baseline.

    python3 benchmarks/bench_engine.py --out DIR [--shapes llama2-7b,llama3-8b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from decode_reference import ReferenceDecode
from engine_shapes import (
    POPULARITIES,
    SHAPES,
    fill_pool,
    install_decode_batch,
    make_engine,
    model_config,
    popularity_slots,
    random_model,
    remove_batch,
    slot_bytes,
)

from lorafleet.kernels import sgmv_launch
from lorafleet.worker import Engine, SamplingParams
from lorafleet.worker.demo_assets import write_random_adapter
from lorafleet.worker.engine_config import LORA_SIDE_STREAM_MODES
from lorafleet.worker.kv_cache import KVCache
from lorafleet.worker.lora_pool import LoraSlotPool
from lorafleet.worker.types import Request

N_SLOTS = 128
REFERENCE_CASES = ((16, 256), (64, 256), (16, 1024), (64, 1024))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 10, 1 GiB)."""
    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.nbytes / statistics.median(times[2:])


def weight_bytes(engine_model, batch: int) -> int:
    """Every parameter once, except the embedding table, of which only the batch's rows are read."""
    total = sum(p.nbytes for name, p in engine_model.named_parameters() if name != "embed_tokens")
    emb = engine_model.embed_tokens
    return total + batch * emb.shape[1] * emb.element_size()


def kv_bytes(config, contexts: list[float]) -> float:
    per_token = KVCache.bytes_per_block(config, 1, torch.bfloat16)
    return per_token * sum(contexts)


LAUNCH_APIS = {
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
}


def profile_steps(fn, n: int) -> dict[str, float]:
    """GPU-busy microseconds (union of device activity), device ops and host launch calls per call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    spans, launches = [], 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end))
        elif e.name in LAUNCH_APIS:
            launches += 1
    spans.sort()
    busy, cur_start, cur_end = 0.0, None, None
    for s, t in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = s, t
        else:
            cur_end = max(cur_end, t)
    if cur_end is not None:
        busy += cur_end - cur_start
    return {"gpu_busy_us": busy / n, "gpu_ops": len(spans) / n, "host_launches": launches / n}


def run_reference(model, config, bw: float, rows: list[dict], shape: str, cases) -> None:
    pool = LoraSlotPool(config.num_hidden_layers, config.lora_shapes(), N_SLOTS, 16, torch.bfloat16, "cuda")
    fill_pool(pool, [16])
    for batch, context in cases:
        for lora in (False, True):
            slots = list(range(batch)) if lora else None
            ref = ReferenceDecode(model, batch, context, pool if lora else None, slots)
            ref.capture()
            ms = ref.time_ms()
            adapter = sum(slot_bytes(pool, s) for s in set(slots)) if lora else 0
            roof = (weight_bytes(model, batch) + kv_bytes(config, [context] * batch) + adapter) / bw
            rows.append(
                {
                    "kind": "reference",
                    "shape": shape,
                    "batch": batch,
                    "context": context,
                    "popularity": "distinct" if lora else "backbone",
                    "step_ms": ms,
                    "roofline_ms": roof * 1e3,
                    "share": roof * 1e3 / ms,
                }
            )
            print(f"reference {shape} b{batch} c{context} {'lora' if lora else 'base'}: {ms:.2f} ms")
            del ref
            torch.cuda.empty_cache()
    del pool
    torch.cuda.empty_cache()


def run_steps(
    engine: Engine,
    config,
    bw: float,
    rows: list[dict],
    shape: str,
    args,
    popularities: list[str],
    tag: str = "",
) -> None:
    rng = random.Random(0)
    if engine.lora_pool.stream is not None:
        tag += f" (LoRA side stream: {engine.lora_pool.side_mode})"
    steps = args.steps
    for context in args.contexts:
        for batch in args.batches:
            # Centre the timed steps on the nominal context (below the context limit); 3 warm-up and
            # 3 profiled steps surround them.
            start = min(context, engine.max_model_len - steps // 2 - 8) - 3 - steps // 2
            mean_context = start + 3 + steps / 2
            need = batch * engine.allocator.blocks_needed(start + steps + 8)
            if need > engine.allocator.num_free:
                print(f"skip {shape} b{batch} c{context}: needs {need} KV blocks")
                continue
            for pop in popularities:
                slots = popularity_slots(pop, batch, N_SLOTS, rng)
                ids = install_decode_batch(engine, slots, start, rng)
                for _ in range(3):
                    engine.step()
                torch.cuda.synchronize()
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    engine.step()
                    times.append(time.perf_counter() - t0)
                prof = profile_steps(engine.step, 3)
                sync_ms = None
                if args.compare_sync:  # the same batch without overlapped stepping, for comparison
                    engine._overlap = False
                    sync_times = []
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        engine.step()
                        sync_times.append(time.perf_counter() - t0)
                    sync_ms = statistics.median(sync_times) * 1e3
                    engine._overlap = not args.sync
                remove_batch(engine, ids)
                ms = statistics.median(times) * 1e3
                distinct = {s for s in slots if s >= 0}
                adapter = sum(slot_bytes(engine.lora_pool, s) for s in distinct)
                kv = kv_bytes(config, [mean_context] * batch)
                roof = (weight_bytes(engine.model, batch) + kv + adapter) / bw
                rows.append(
                    {
                        "kind": "engine",
                        "shape": shape,
                        "batch": batch,
                        "context": context,
                        "mean_context": mean_context,
                        "popularity": pop + tag,
                        "distinct_adapters": len(distinct),
                        "step_ms": ms,
                        "step_ms_min": min(times) * 1e3,
                        "roofline_ms": roof * 1e3,
                        "share": roof * 1e3 / ms,
                        "gpu_busy": prof["gpu_busy_us"] / 1e3 / ms,
                        "gpu_ops": prof["gpu_ops"],
                        "host_launches": prof["host_launches"],
                        "overlap": not args.sync,
                        "step_ms_sync": sync_ms,
                    }
                )
                r = rows[-1]
                print(
                    f"engine {shape} b{batch} c{context} {r['popularity']}: {ms:.2f} ms, "
                    f"roofline {r['roofline_ms']:.2f} "
                    f"({100 * r['share']:.0f}%), busy {100 * r['gpu_busy']:.0f}%, ops {r['gpu_ops']:.0f}, "
                    f"launches {r['host_launches']:.0f}"
                    + (f", without overlap {sync_ms:.2f} ms" if sync_ms is not None else ""),
                    flush=True,
                )


def run_requests(engine: Engine, requests: list[Request]) -> dict[str, float]:
    """Add every request at once and step to completion: tokens/s, TTFT and TPOT percentiles."""
    t0 = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    while engine.has_unfinished():
        for d in engine.step():
            now = time.perf_counter() - t0
            if d.new_token_ids:
                first.setdefault(d.request_id, now)
                last[d.request_id] = now
                count[d.request_id] = count.get(d.request_id, 0) + len(d.new_token_ids)
            if d.error:
                raise RuntimeError(d.error)
    wall = time.perf_counter() - t0
    ttft = sorted(first.values())
    tpot = sorted((last[r] - first[r]) / (count[r] - 1) for r in first if count[r] > 1)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "requests": len(requests),
        "tokens": sum(count.values()),
        "wall_s": wall,
        "tokens_per_s": sum(count.values()) / wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "tpot_p50_ms": 1e3 * pct(tpot, 0.5),
        "tpot_p99_ms": 1e3 * pct(tpot, 0.99),
    }


def run_end_to_end(engine: Engine, shape: str, tmp: Path, rows: list[dict], args) -> None:
    vocab = engine.model_config.vocab_size
    dirs = [
        write_random_adapter(tmp / f"{shape}-a{i}", SHAPES[shape], 16, seed=i)
        for i in range(args.adapter_files)
    ]
    names = [f"tenant-{i}" for i in range(1000)]
    for i, name in enumerate(names):
        engine.add_adapter(name, dirs[i % len(dirs)])

    def fixed(tag: str, new: int) -> list[Request]:
        rng = random.Random(1)
        sp = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        return [
            Request(f"{tag}-{i}", tuple(rng.randrange(3, vocab) for _ in range(128)), names[i], sp)
            for i in range(64)
        ]

    def punica(tag: str) -> list[Request]:
        rng = random.Random(2)
        reqs = []
        weights = [1.5**-i for i in range(len(names))]
        for i in range(256):
            prompt = int(min(2048, max(8, rng.lognormvariate(5.5, 0.8))))
            new = int(min(512, max(8, rng.lognormvariate(4.2, 0.7))))
            adapter = rng.choices(names, weights=weights)[0]
            sp = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
            reqs.append(
                Request(f"{tag}-{i}", tuple(rng.randrange(3, vocab) for _ in range(prompt)), adapter, sp)
            )
        return reqs

    # The first pass of each workload reads the adapters from disk and compiles the eager (prefill
    # and mixed) steps' kernel variants; the second, identical pass is the timed one.
    cold = run_requests(engine, fixed("cold", 32))
    rows.append(
        {"kind": "e2e", "shape": shape, "workload": "fixed b64 p128 n32 distinct, first pass", **cold}
    )
    hot = run_requests(engine, fixed("hot", 32))
    rows.append({"kind": "e2e", "shape": shape, "workload": "fixed b64 p128 n32 distinct", **hot})
    run_requests(engine, punica("warm"))
    rows.append(
        {
            "kind": "e2e",
            "shape": shape,
            "workload": "punica lognormal 256 skewed",
            **run_requests(engine, punica("punica")),
        }
    )
    for r in rows[-3:]:
        print(
            f"e2e {shape} {r['workload']}: {r['tokens_per_s']:.0f} tok/s, "
            f"TTFT p50 {r['ttft_p50_s']:.3f} s, TPOT p50 {r['tpot_p50_ms']:.2f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="llama2-7b,llama3-8b")
    parser.add_argument("--batches", default="1,16,32,64,128,256")
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--popularities", default=",".join(POPULARITIES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--adapter-files", type=int, default=4)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--peft-new-tokens", type=int, default=8, help="0 skips the PEFT baseline")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--sync", action="store_true", help="turn overlapped stepping off")
    parser.add_argument(
        "--compare-lora-stream",
        nargs="?",
        const="full,shrink",
        default="",
        help="time the adapter cases again with LoRA kernels on a side stream, in each mode named "
        "(EngineConfig.lora_side_stream: full, shrink; bare: both)",
    )
    parser.add_argument(
        "--compare-sgmv-rows",
        action="store_true",
        help="time the adapter cases again with the SGMV tile kernels only (row-wise expand off)",
    )
    parser.add_argument(
        "--compare-sync", action="store_true", help="also time each decode case without overlapped stepping"
    )
    args = parser.parse_args()
    side_modes = [m for m in args.compare_lora_stream.split(",") if m]
    on_modes = [m for m in LORA_SIDE_STREAM_MODES if m != "off"]
    if any(m not in on_modes for m in side_modes):
        modes = ", ".join(on_modes)
        parser.error(f"--compare-lora-stream: modes are {modes}, got {args.compare_lora_stream!r}")
    args.batches = [int(x) for x in args.batches.split(",")]
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.popularities = args.popularities.split(",")
    if not torch.cuda.is_available():
        print("bench_engine.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    for shape in args.shapes.split(","):
        config = model_config(shape)
        model = random_model(config)
        if not args.no_reference:
            run_reference(model, config, bw, rows, shape, REFERENCE_CASES)
        # The Punica workload's longest request: a 2,048-token prompt and 512 new tokens.
        longest = max(args.contexts) + args.steps + 64 if args.no_e2e else max(max(args.contexts), 2560) + 64
        max_len = min(config.max_position_embeddings, longest)
        t0 = time.perf_counter()
        engine = make_engine(
            model,
            config,
            max_batch_size=max(args.batches),
            max_loras=N_SLOTS,
            max_lora_rank=16,
            max_model_len=max_len,
            host_cache_bytes=64 << 30,
            enforce_eager=args.enforce_eager,
            async_scheduling=not args.sync,
            # Every graph before the first measured step: this measures the steady state.
            graph_capture="start",
        )
        startup = time.perf_counter() - t0
        print(
            f"engine {shape}: start-up with graph capture {startup:.1f} s, "
            f"{engine.allocator.num_blocks} KV blocks"
        )
        rows.append({"kind": "startup", "shape": shape, "seconds": startup})
        fill_pool(engine.lora_pool, [16])
        run_steps(engine, config, bw, rows, shape, args, args.popularities)
        with_lora = [p for p in args.popularities if p != "backbone"]
        for mode in side_modes if with_lora else []:
            engine.lora_pool.stream = torch.cuda.Stream()
            engine.lora_pool.side_mode = mode
            engine.runner.recapture()
            run_steps(engine, config, bw, rows, shape, args, with_lora)
            engine.lora_pool.stream = None
            engine.runner.recapture()
        if args.compare_sgmv_rows and with_lora:
            # The same batches with the SGMV tile kernels only (no row-wise kernels), re-captured.
            saved = sgmv_launch.ROWS_MAX_AVG_ROWS
            sgmv_launch.ROWS_MAX_AVG_ROWS = 0.0
            engine.runner.recapture()
            run_steps(engine, config, bw, rows, shape, args, with_lora, " (tile SGMV only)")
            sgmv_launch.ROWS_MAX_AVG_ROWS = saved
            engine.runner.recapture()
        if not args.no_e2e:
            run_end_to_end(engine, shape, tmp, rows, args)
        del engine, model
        torch.cuda.empty_cache()
        if args.peft_new_tokens:
            import peft_baseline

            for batch in (32, 64):
                peft_model = peft_baseline.build(SHAPES[shape], n_adapters=batch)
                tps = peft_baseline.tokens_per_second(
                    peft_model, batch, 128, args.peft_new_tokens, SHAPES[shape]["vocab_size"]
                )
                rows.append({"kind": "peft", "shape": shape, "batch": batch, "tokens_per_s": tps})
                print(f"transformers+PEFT {shape} b{batch} distinct: {tps:.1f} tok/s", flush=True)
                del peft_model
                torch.cuda.empty_cache()
        (args.out / "bench_engine.json").write_text(json.dumps({"copy_bw": bw, "rows": rows}, indent=1))
    print(markdown(rows, bw))
    return 0


def markdown(rows: list[dict], bw: float) -> str:
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s", ""]
    lines += [
        "| shape | kind | batch | context | popularity | step ms | roofline ms | share | GPU busy "
        "| GPU ops | launches | step ms without overlap |"
    ]
    lines += ["|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] in ("engine", "reference"):
            busy = f"{100 * r['gpu_busy']:.0f}%" if "gpu_busy" in r else ""
            ops = f"{r['gpu_ops']:.0f}" if "gpu_ops" in r else ""
            launches = f"{r['host_launches']:.0f}" if "host_launches" in r else ""
            sync = f"{r['step_ms_sync']:.2f}" if r.get("step_ms_sync") is not None else ""
            lines.append(
                f"| {r['shape']} | {r['kind']} | {r['batch']} | {r['context']} | {r['popularity']} | "
                f"{r['step_ms']:.2f} | {r['roofline_ms']:.2f} | {100 * r['share']:.0f}% | {busy} | {ops} | "
                f"{launches} | {sync} |"
            )
    lines += [
        "",
        "| shape | workload | tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["kind"] == "e2e":
            lines.append(
                f"| {r['shape']} | {r['workload']} | {r['tokens_per_s']:.0f} | {r['ttft_p50_s']:.3f} | "
                f"{r['ttft_p99_s']:.3f} | {r['tpot_p50_ms']:.2f} | {r['tpot_p99_ms']:.2f} |"
            )
        elif r["kind"] == "peft":
            lines.append(
                f"| {r['shape']} | transformers+PEFT b{r['batch']} distinct | "
                f"{r['tokens_per_s']:.1f} | | | | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
