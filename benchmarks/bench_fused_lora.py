"""GPU: the deferred LoRA expand inside RoPE + KV write and SiLU·up, against the separate expand launch
followed by the plain kernel, per call at Llama-2-7B sizes (bf16, r16, the engine's decode layout).

Each variant is captured as a CUDA graph of REPS calls, each call preceded by a 256 MB write that
empties the L2 (as a decode step finds it: B and the weights of other layers went through in
between); the flush alone is timed the same way and subtracted. Prints a table; the shrink is not
timed (both ways run it).

    python benchmarks/bench_fused_lora.py [--reps 50]
"""

from __future__ import annotations

import argparse
import sys

import torch

from lorafleet.kernels import lora_fused_triton
from lorafleet.kernels.fused_ops import rope_and_cache, silu_and_mul
from lorafleet.kernels.lora_deferred import shrink_lora_slices

H, INTER, HQ, HKV, D = 4096, 11008, 32, 32, 128
N_SLOTS = 128


def layout(T: int, popularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    if popularity == "distinct":
        slots = torch.arange(T, dtype=torch.int32) % N_SLOTS
        return torch.arange(T + 1, dtype=torch.int32).cuda(), slots.cuda()
    indptr = torch.full((T + 1,), T, dtype=torch.int32)
    indptr[0] = 0
    slots = torch.full((T,), -1, dtype=torch.int32)
    slots[0] = 3
    return indptr.cuda(), slots.cuda()


def rand(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * 0.05).to(torch.bfloat16)


def time_graph(fn, reps: int, flush: torch.Tensor) -> float:
    """Microseconds per call of ``fn`` (with its L2 flush) in a graph of ``reps`` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            flush.zero_()
            fn()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / reps)
    return best


def bench_case(T: int, popularity: str, w: dict, reps: int, flush: torch.Tensor, flush_us: float) -> None:
    indptr, slots = layout(T, popularity)
    x = rand(T, H)
    gate_up, out = rand(T, 2 * INTER), torch.empty(T, INTER, dtype=torch.bfloat16, device="cuda")
    gu = shrink_lora_slices(x, w["a_gu"], w["b_gu"], indptr, slots, cols=(0, INTER), ranks=w["ranks"])
    qkv = rand(T, (HQ + 2 * HKV) * D)
    cos, sin = rand(T, D), rand(T, D)
    slot_mapping = torch.arange(T, device="cuda") * 3
    cols = (0, HQ * D, (HQ + HKV) * D)
    qkv_lora = shrink_lora_slices(x, w["a_qkv"], w["b_qkv"], indptr, slots, cols=cols, ranks=w["ranks"])
    kw = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D)

    def rope(lora=None, separate=False):
        if separate:
            qkv_lora.apply(qkv)
        rope_and_cache(qkv, cos, sin, w["k_cache"], w["v_cache"], slot_mapping, lora=lora, **kw)

    def silu(lora=None, separate=False):
        if separate:
            gu.apply(gate_up)
        silu_and_mul(gate_up, out, lora=lora)

    for name, fn, pending in (
        ("silu_and_mul (gate|up)", silu, gu),
        ("rope_and_cache (q|k|v)", rope, qkv_lora),
    ):
        plain = time_graph(fn, reps, flush) - flush_us
        sep = time_graph(lambda fn=fn: fn(separate=True), reps, flush) - flush_us
        fused = time_graph(lambda fn=fn, p=pending: fn(lora=p), reps, flush) - flush_us
        cells = f"{plain:.1f} | {sep:.1f} | {fused:.1f} | {fused - sep:+.1f}"
        print(f"| {name} | {T} | {popularity} | {cells} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--tile-elems", default="4096", help="lora_fused_triton.TILE_ELEMS values to time")
    ap.add_argument("--by-rank", default="1", help="lora_fused_triton.LOAD_BY_RANK values (1,0) to time")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fused_lora.py needs a CUDA GPU", file=sys.stderr)
        return 2
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    flush_us = time_graph(lambda: None, args.reps, flush)
    print(f"{torch.cuda.get_device_name()}; L2 flush alone {flush_us:.1f} us (subtracted)")
    k_cache = torch.zeros(512, 16, HKV, D, dtype=torch.bfloat16, device="cuda")
    weights = {
        "a_gu": [rand(N_SLOTS, 16, H) for _ in range(2)],
        "b_gu": [rand(N_SLOTS, INTER, 16) for _ in range(2)],
        "a_qkv": [rand(N_SLOTS, 16, H) for _ in range(3)],
        "b_qkv": [rand(N_SLOTS, HQ * D, 16), rand(N_SLOTS, HKV * D, 16), rand(N_SLOTS, HKV * D, 16)],
        "ranks": torch.full((N_SLOTS,), 16, dtype=torch.int32, device="cuda"),
        "k_cache": k_cache,
        "v_cache": torch.zeros_like(k_cache),
    }
    print("| kernel | T | popularity | plain us | separate expand + plain us | fused us | fused - separate |")
    print("|---|---:|---|---:|---:|---:|---:|")
    variants = [(int(t), b == "1") for t in args.tile_elems.split(",") for b in args.by_rank.split(",")]
    for tile, by_rank in variants:
        lora_fused_triton.TILE_ELEMS = tile
        lora_fused_triton.LOAD_BY_RANK = by_rank
        print(f"TILE_ELEMS {tile}, LOAD_BY_RANK {by_rank}")
        for T in [int(t) for t in args.batches.split(",")]:
            for popularity in ("identical", "distinct"):
                bench_case(T, popularity, weights, args.reps, flush, flush_us)
    return 0


if __name__ == "__main__":
    sys.exit(main())
