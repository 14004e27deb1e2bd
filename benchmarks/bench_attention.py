"""Paged decode attention benchmark (GPU): lorafleet's Triton kernel against the gather + SDPA path.

For Llama-2-7B (Hq = Hkv = 32) and Llama-3-8B (Hq = 32, Hkv = 8) layers (D = 128, bf16, 16-token
pages shuffled over the cache), batch 16 / 64 / 256, every sequence at context 256 / 1024 / 4096, it
times one layer's attention on the GPU with ``bench_sgmv.Timer`` (a warm-up call, then every timed call
queued behind a spin kernel so host launch overhead is excluded, as under a CUDA graph; CUDA events
around each call; L2 flushed before each; median):

- ``triton``: ``paged_decode_attention`` (split-K chosen from shapes, merge kernel included);
- ``gather_sdpa``: ``worker/attention.py``'s ``paged_attention`` (its per-step ``build_metadata`` is
  built once, outside the timing, as the engine shares it across layers).

It reports µs per call and the achieved bandwidth: KV bytes read (context * Hkv * D * 2 tensors *
2 bytes per sequence) over the time, also as a share of the device-to-device copy bandwidth (read +
write) measured in the same run. Block tables are exactly as wide as the context here, so the split
factor is what a table sized for that context gets.

Then a few prefill cases (fresh prompts, chunks on a cached context) as attention TFLOP/s, with flash
SDPA on contiguous tensors for the fresh prompts.

    python3 benchmarks/bench_attention.py [--out DIR] [--no-gather] [--no-prefill] [--set NAME=INT ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_sgmv import Timer, copy_bandwidth

from lorafleet.kernels import attention_launch
from lorafleet.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from lorafleet.worker.attention import build_metadata, paged_attention
from lorafleet.worker.batch import BatchLayout
from lorafleet.worker.demo_shapes import SHAPES as MODEL_SHAPES

SHAPES = {  # (query heads, KV heads, head dim), from the project's one shape table
    name: (MODEL_SHAPES[name].num_heads, MODEL_SHAPES[name].num_kv_heads, MODEL_SHAPES[name].head_dim)
    for name in ("llama2-7b", "llama3-8b")
}
BATCHES = (16, 64, 256)
CONTEXTS = (256, 1024, 4096)
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
REPS = 50
GATHER_REPS = 20


def decode_batch(lens: list[int], block_tables: torch.Tensor) -> BatchLayout:
    """A decode-only BatchLayout (one row per sequence) for the gather + SDPA path."""
    batch = len(lens)
    dev = block_tables.device
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    positions = (seq_lens - 1).long()
    slots = block_tables[torch.arange(batch, device=dev), positions // BLOCK_SIZE].long() * BLOCK_SIZE
    return BatchLayout(
        input_ids=torch.zeros(batch, dtype=torch.int64, device=dev),
        positions=positions,
        seq_ids=tuple(str(i) for i in range(batch)),
        query_lens=(1,) * batch,
        context_lens=tuple(lens),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        seq_lens=seq_lens,
        block_tables=block_tables,
        slot_mapping=slots + positions % BLOCK_SIZE,
        max_query_len=1,
        max_context_len=max(lens),
        lora_seg_indptr=torch.tensor([0, batch], dtype=torch.int32, device=dev),
        lora_seg_slots=torch.tensor([-1], dtype=torch.int32, device=dev),
        logits_indices=torch.arange(batch, device=dev),
        sample_seq_ids=tuple(str(i) for i in range(batch)),
    )


def run_shape(name: str, gen: torch.Generator, timer: Timer, bw: float, skip_gather: bool) -> list[dict]:
    hq, hkv, d = SHAPES[name]
    max_tokens = max(BATCHES) * max(CONTEXTS)
    num_blocks = max_tokens // BLOCK_SIZE
    # One cache for all cases of the shape; each case reads a random subset of its pages.
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    rows = []
    for batch in BATCHES:
        for ctx in CONTEXTS:
            nb = ctx // BLOCK_SIZE
            pages = torch.randperm(num_blocks, generator=gen)[: batch * nb].view(batch, nb)
            block_tables = pages.to(torch.int32).cuda()
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, hq, d, device="cuda", dtype=DTYPE)
            out = torch.empty_like(q)
            scale = d**-0.5
            fn = functools.partial(
                paged_decode_attention, out, q, k_cache, v_cache, block_tables, seq_lens, scale=scale
            )
            t_triton = statistics.median(timer(fn, REPS))
            splits = attention_launch.default_num_splits(q, k_cache, block_tables)
            kv_bytes = batch * ctx * hkv * d * 2 * 2
            row = dict(
                shape=name,
                batch=batch,
                context=ctx,
                num_splits=splits,
                triton_us=t_triton,
                triton_gbs=kv_bytes / (t_triton * 1e-6) / 1e9,
            )
            if not skip_gather:
                meta = build_metadata(decode_batch([ctx] * batch, block_tables), BLOCK_SIZE)
                ref = paged_attention(q, k_cache, v_cache, meta, scale).view_as(q)
                fn()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                gather = functools.partial(paged_attention, q, k_cache, v_cache, meta, scale)
                t_gather = statistics.median(timer(gather, GATHER_REPS))
                row.update(gather_sdpa_us=t_gather, speedup=t_gather / t_triton, rel_err_vs_gather=err)
                del meta
            row["pct_copy_bw"] = 100 * row["triton_gbs"] / bw
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    return rows


# Prefill cases (sequences, context after the step, query rows each): fresh prompts, and chunks on a
# cached context. Reported as attention TFLOP/s (4 * D * visible (query, key) pairs * Hq).
PREFILL_CASES = ((4, 2048, 2048), (4, 4608, 512))


def run_prefill(name: str, timer: Timer) -> list[dict]:
    hq, hkv, d = SHAPES[name]
    rows = []
    for seqs, ctx, qlen in PREFILL_CASES:
        nb = ctx // BLOCK_SIZE
        k_cache = torch.randn(seqs * nb, BLOCK_SIZE, hkv, d, device="cuda", dtype=DTYPE)
        v_cache = torch.randn_like(k_cache)
        block_tables = torch.randperm(seqs * nb).view(seqs, nb).to(torch.int32).cuda()
        seq_lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
        starts = torch.arange(0, seqs * qlen + 1, qlen, dtype=torch.int32, device="cuda")
        q = torch.randn(seqs * qlen, hq, d, device="cuda", dtype=DTYPE)
        out = torch.empty_like(q)
        fn = functools.partial(
            paged_prefill_attention,
            out,
            q,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            starts,
            max_query_len=qlen,
            scale=d**-0.5,
        )
        us = statistics.median(timer(fn, REPS))
        pairs = seqs * sum(ctx - qlen + i + 1 for i in range(qlen))
        row = dict(
            shape=name,
            seqs=seqs,
            context=ctx,
            query_len=qlen,
            triton_us=us,
            tflops=4 * d * hq * pairs / (us * 1e-6) / 1e12,
        )
        if ctx == qlen:  # same work on contiguous tensors: flash SDPA, causal
            qs = q.view(seqs, qlen, hq, d).transpose(1, 2)
            ks = torch.randn(seqs, hkv, ctx, d, device="cuda", dtype=DTYPE)
            sdpa = functools.partial(
                F.scaled_dot_product_attention, qs, ks, ks, is_causal=True, enable_gqa=hq != hkv
            )
            row["flash_sdpa_us"] = statistics.median(timer(sdpa, REPS))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], bw: float, device: str) -> str:
    lines = [
        f"Decode attention, one layer, bf16, D=128, block_size {BLOCK_SIZE}, {device}; "
        f"copy bandwidth {bw:.0f} GB/s",
        "",
        "| shape | batch | context | splits | triton µs | GB/s | % copy bw | gather+SDPA µs | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r.get("gather_sdpa_us")
        gather = "-" if g is None else f"{g:.1f}"
        speedup = "-" if g is None else f"{r['speedup']:.1f}x"
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['context']} | {r['num_splits']} | {r['triton_us']:.1f} | "
            f"{r['triton_gbs']:.0f} | {r['pct_copy_bw']:.0f}% | {gather} | {speedup} |"
        )
    return "\n".join(lines)


def prefill_markdown(rows: list[dict]) -> str:
    lines = [
        "Prefill (paged_prefill_attention), bf16, D=128; flash SDPA on contiguous K/V for fresh prompts",
        "",
        "| shape | seqs | context | query rows | triton µs | TFLOP/s | flash SDPA µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r.get("flash_sdpa_us")
        lines.append(
            f"| {r['shape']} | {r['seqs']} | {r['context']} | {r['query_len']} | {r['triton_us']:.1f} | "
            f"{r['tflops']:.0f} | {'-' if f is None else f'{f:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for attention.json")
    ap.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES)
    )
    ap.add_argument("--no-gather", action="store_true", help="skip the gather + SDPA baseline")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill cases")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="override a launch constant of kernels/attention_launch.py (e.g. PROGRAMS_PER_SM=8)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if not key.isupper() or not hasattr(attention_launch, key) or not value.lstrip("-").isdigit():
            ap.error(f"--set: {item!r} is not NAME=INT for a constant of attention_launch")
        setattr(attention_launch, key, int(value))
        overrides[key] = int(value)
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        ap.error(f"--shapes: unknown {unknown}")
    t0 = time.perf_counter()
    timer = Timer()
    bw = copy_bandwidth(timer)
    device = torch.cuda.get_device_name()
    print(f"device {device}; copy bandwidth {bw:.0f} GB/s (read+write)", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows, prefill_rows = [], []
    for name in shapes:
        rows += run_shape(name, gen, timer, bw, args.no_gather)
    if not args.no_prefill:
        for name in shapes:
            prefill_rows += run_prefill(name, timer)
    table = markdown(rows, bw, device)
    if prefill_rows:
        table += "\n\n" + prefill_markdown(prefill_rows)
    print(table)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = dict(device=device, copy_gbs=bw, overrides=overrides, rows=rows, prefill=prefill_rows)
        (args.out / "attention.json").write_text(json.dumps(payload, indent=2))
        (args.out / "attention.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
