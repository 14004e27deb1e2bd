"""What bounds SGMV decode latency: add_lora against the cheapest kernels that do part of its work.

For r16 decode batches (one token per sequence) it times, with bench_sgmv's method (calls queued
behind a spin kernel, CUDA events around each call, median), under two L2 policies before each call:

- ``write``: bench_sgmv's flush, a 256 MB write. The L2 is left full of dirty lines, so a line a
  kernel brings in may first cost the write-back of another.
- ``read``: a 256 MB read. The L2 is left full of clean lines.

and these kernels:

- ``empty``: one launch that does nothing (the per-launch floor of this timing method);
- ``chain``: one launch whose programs load their segment's slot, then one element of that slot's A
  (two dependent memory round trips, the least any SGMV kernel does);
- ``stream``, ``stream_4k``: one launch that reads the adapter weights add_lora must read (each
  segment's A and B at its true rank) and nothing else, 16 KB or 8 KB per program: what the weight
  traffic alone costs (measured, not a proven lower bound);
- ``shrink``, ``expand``, ``add_lora`` (lorafleet's kernels, as in bench_sgmv);
- ``fused_1k``, ``fused_2k``: a one-launch add_lora for rows of one adapter each (a probe, not
  lorafleet's kernel): program (row, chunk of 1,024 or 2,048 output columns) loads its chunk of B
  first (the address needs only the slot), then computes the row's whole shrink (re-reading A[slot]
  once per chunk, from L2 after the first) and adds the product into y. Its error against add_lora
  is printed; it tells whether one launch could reach the 1.3x target before anything is built.

    python3 benchmarks/bench_decode_floor.py --out DIR
    python3 benchmarks/bench_decode_floor.py --ncu-case 64   # a few add_lora calls, for ncu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from bench_sgmv import Case, Timer

TOKENS = (1, 16, 32, 64)


@triton.jit
def _empty_kernel(out_ptr):
    pass


@triton.jit
def _chain_kernel(seg_slots_ptr, a_ptr, out_ptr, stride_a_slot):
    seg = tl.program_id(0)
    slot = tl.load(seg_slots_ptr + seg)
    v = tl.load(a_ptr + slot.to(tl.int64) * stride_a_slot)
    # A store the compiler cannot drop, almost never taken.
    if v == 12345.0:
        tl.store(out_ptr + seg, v)


@triton.jit
def _stream_kernel(
    seg_slots_ptr, a_ptr, b_ptr, out_ptr, a_elems, stride_a_slot, stride_b_slot, BLOCK: tl.constexpr
):
    """Program (seg, chunk) reads chunk ``chunk`` of A[slot] ++ B[slot] (each a_elems long)."""
    seg = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    in_a = offs < a_elems
    a = tl.load(a_ptr + slot * stride_a_slot + offs, mask=in_a, other=0.0)
    b = tl.load(b_ptr + slot * stride_b_slot + offs - a_elems, mask=(~in_a) & (offs < 2 * a_elems), other=0.0)
    s = tl.sum(a.to(tl.float32) + b.to(tl.float32), 0)
    if s == 12345.0:
        tl.store(out_ptr + seg, s)


@triton.jit
def _fused_rows_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    row_slots_ptr,
    scales_ptr,
    H_IN,
    H_OUT,
    stride_x,
    stride_y,
    stride_a_slot,
    stride_b_slot,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y[row, chunk] += scale * (x[row] @ A[slot].T) @ B[slot, chunk].T, slot = row_slots[row]."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H_OUT
    slot = tl.load(row_slots_ptr + row)
    k_slot = tl.maximum(slot, 0).to(tl.int64)
    use = (n * 0 + slot) >= 0
    r = tl.arange(0, R)
    bt = tl.load(
        b_ptr + k_slot * stride_b_slot + n.to(tl.int64)[:, None] * R + r[None, :],
        mask=(n_mask & use)[:, None],
        other=0.0,
    )
    acc = tl.zeros((R,), dtype=tl.float32)
    for k0 in range(0, H_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < H_IN
        xv = tl.load(x_ptr + row * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
        at = tl.load(
            a_ptr + k_slot * stride_a_slot + r[:, None] * H_IN + k[None, :], mask=k_mask[None, :], other=0.0
        )
        acc += tl.sum(at.to(tl.float32) * xv[None, :], axis=1)
    dtype = y_ptr.dtype.element_ty
    v = (acc * tl.load(scales_ptr + k_slot)).to(dtype).to(tl.float32)
    delta = tl.sum(bt.to(tl.float32) * v[None, :], axis=1)
    y_row = y_ptr + row * stride_y + n
    yv = tl.load(y_row, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_row, (yv + delta).to(dtype), mask=n_mask & use)


def fused_rows(x, a, b, y, row_slots, scales, block_n: int, block_k: int = 512) -> None:
    """Launch the probe: x [T, H_IN], a [slots, R, H_IN], b [slots, H_OUT, R], y [T, H_OUT],
    row_slots [T] (-1: no adapter), scales [slots] float32; every stack contiguous."""
    T, h_out = y.shape
    rank = a.shape[1]
    _fused_rows_kernel[(T, triton.cdiv(h_out, block_n))](
        x,
        a,
        b,
        y,
        row_slots,
        scales,
        a.shape[2],
        h_out,
        x.stride(0),
        y.stride(0),
        a.stride(0),
        b.stride(0),
        R=rank,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        num_warps=8,
    )


class Probes:
    def __init__(self, case: Case) -> None:
        self.case = case
        self.out = torch.empty(max(case.T, 1), dtype=torch.float32, device="cuda")
        self.a, self.b = case.a[0], case.b[0]
        # r16, h_in = h_out = 4096: A[slot] and B[slot] hold the same number of elements.
        assert self.a[0].numel() == self.b[0].numel()

    def empty(self) -> None:
        _empty_kernel[(1,)](self.out)

    def chain(self) -> None:
        _chain_kernel[(self.case.seg_slots.numel(),)](self.case.seg_slots, self.a, self.out, self.a.stride(0))

    def stream(self, block: int = 8192) -> None:
        n = self.a[0].numel()
        grid = (self.case.seg_slots.numel(), triton.cdiv(2 * n, block))
        _stream_kernel[grid](
            self.case.seg_slots,
            self.a,
            self.b,
            self.out,
            n,
            self.a.stride(0),
            self.b.stride(0),
            BLOCK=block,
            num_warps=8,
        )

    def fused(self, block_n: int) -> None:
        c = self.case
        fused_rows(c.x, self.a, self.b, c.y, c.token_slots, c.scales, block_n)

    def fused_error(self, block_n: int) -> float:
        """Max |fused - add_lora| over y, both from the same start."""
        c = self.case
        c.y.copy_(c.y_init)
        c.add_lora()
        want = c.y.clone()
        c.y.copy_(c.y_init)
        self.fused(block_n)
        return float((c.y.float() - want.float()).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for decode_floor.json")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--ncu-case", type=int, help="run r16 distinct T=N add_lora 3 times (for ncu), exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_floor needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    if args.ncu_case:
        case = Case("o4096", 16, args.ncu_case, "distinct", gen)
        timer = Timer()
        for _ in range(3):
            timer.flush_l2()
            case.add_lora()
        torch.cuda.synchronize()
        return 0
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    timers = {"write": Timer(), "read": Timer(flush="read")}
    rows = []
    for pop in ("distinct", "identical"):
        for T in TOKENS:
            case = Case("o4096", 16, T, pop, gen)
            probes = Probes(case)
            fns = {
                "empty": probes.empty,
                "chain": probes.chain,
                "stream": probes.stream,
                "stream_4k": lambda p=probes: p.stream(4096),
                "shrink": case.shrink,
                "expand": case.expand,
                "add_lora": case.add_lora,
                "fused_1k": lambda p=probes: p.fused(1024),
                "fused_2k": lambda p=probes: p.fused(2048),
            }
            errors = {n: probes.fused_error(n) for n in (1024, 2048)}
            print(f"r16 T={T:<3d} {pop:9s} fused probe max error against add_lora: {errors}", flush=True)
            for policy, timer in timers.items():
                med = {k: statistics.median(timer(fn, args.reps)) for k, fn in fns.items()}
                rows.append(dict(T=T, popularity=pop, policy=policy, weight_bytes=case.weight_bytes, us=med))
                cells = " ".join(f"{k} {v:5.1f}" for k, v in med.items())
                print(f"r16 T={T:<3d} {pop:9s} flush={policy:5s} {cells}", flush=True)
            del case, probes
    dev = torch.cuda.get_device_name()
    report = dict(device=dev, rows=rows, argv=sys.argv)
    (args.out / "decode_floor.json").write_text(json.dumps(report, indent=1))
    names = list(rows[0]["us"])
    lines = [
        f"Device: {dev}. Median µs of {args.reps} calls; r16, h_in = h_out = 4096, 512 adapters per pool.",
        "",
        "| T | popularity | L2 flush | weight MB | " + " | ".join(names) + " |",
        "|---:|---|---|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        cells = " | ".join(f"{r['us'][k]:.1f}" for k in names)
        mb = r["weight_bytes"] / 1e6
        lines.append(f"| {r['T']} | {r['popularity']} | {r['policy']} | {mb:.1f} | {cells} |")
    (args.out / "decode_floor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
