"""Launch configuration and launchers for the Triton SGMV kernels.

Tile sizes are chosen from shapes only (T, S, widths, r_max), never from metadata values, so the
choice needs no host sync and a captured CUDA graph replays the same kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from lorafleet.kernels.sgmv_triton import _sgmv_expand_kernel, _sgmv_shrink_kernel

# Enough programs to keep every SM of a large GPU (132 on an H100/H200) busy several times over:
# these kernels are memory-bound, so parallel loads in flight are what matters.
_TARGET_PROGRAMS = 528
# Launch parameters (module-level so benchmarks/bench_sgmv.py --sweep can vary them).
SHRINK_BLOCK_K = 256
SHRINK_NUM_WARPS = 4
EXPAND_BLOCK_N = 128
EXPAND_NUM_WARPS = 4


def _seg_block(num_segs: int) -> int:
    # Powers of 4 bound the number of compiled variants while keeping the in-kernel scan short.
    block = 16
    while block < num_segs:
        block *= 4
    return block


def _block_m(T: int, num_segs: int) -> int:
    """Short segments (decode) and small batches use the smallest tensor-core tile, which gives the
    most programs; long segments of a large batch (prefill) a wider tile that re-reads A and B less."""
    avg_rows = T / max(num_segs, 1)
    return 16 if avg_rows <= 24 or T <= 256 else 64


def _max_tiles(T: int, num_segs: int, block_m: int) -> int:
    # Each segment wastes at most one partial tile.
    return max(1, min(num_segs, T) + triton.cdiv(T, block_m))


def _elem_offset(t: torch.Tensor, base: torch.Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise ValueError("slice stacks must be aligned to their element size")
    return delta // t.element_size()


class _ColumnPlan:
    """How output columns of 1..3 slices are cut into programs: each program covers N_PER_PROG
    columns of one slice in a loop over BLOCK_N chunks (several weight loads in flight, one segment
    lookup), with N_PER_PROG shrunk until the grid covers the GPU."""

    def __init__(self, lora_bs: Sequence[torch.Tensor], tiles: int, block_m: int) -> None:
        self.block_n = EXPAND_BLOCK_N if block_m == 16 else 64
        self.widths = [b.shape[1] for b in lora_bs] + [0] * (3 - len(lora_bs))
        self.cols = [0, self.widths[0], self.widths[0] + self.widths[1]]
        per_prog = triton.cdiv(max(self.widths), self.block_n)
        while per_prog > 1 and tiles * self._programs(per_prog * self.block_n) < _TARGET_PROGRAMS:
            per_prog = triton.cdiv(per_prog, 2)
        self.n_per_prog = per_prog * self.block_n
        self.n_progs = [triton.cdiv(w, self.n_per_prog) for w in self.widths]
        self.grid = (tiles, sum(self.n_progs))
        b0 = lora_bs[0]
        self.b_offs = [_elem_offset(b, b0) for b in lora_bs] + [0, 0]
        self.slot_strides = [b.stride(0) for b in lora_bs] + [0] * (3 - len(lora_bs))

    def _programs(self, n_per_prog: int) -> int:
        return sum(triton.cdiv(w, n_per_prog) for w in self.widths)


def shrink(
    x: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    *,
    zero_fill: bool,
) -> torch.Tensor:
    """Returns float32 partial sums ``[split_k, n_slices, T, r_max]`` (summed over split_k by expand)."""
    T, h_in = x.shape
    n_slices = len(lora_as)
    _, r_max, _ = lora_as[0].shape
    num_segs = seg_slots.shape[0]
    block_m = _block_m(T, num_segs)
    block_r = min(64, max(16, triton.next_power_of_2(r_max)))
    num_r_tiles = triton.cdiv(r_max, block_r)
    tiles = _max_tiles(T, num_segs, block_m)
    block_k = SHRINK_BLOCK_K if block_m == 16 else 64
    # Split h_in until the grid covers the GPU. Expand re-reads every partial, so long (prefill)
    # tiles, whose partials are large, split less.
    max_split = 16 if block_m == 16 else 4
    split_k = 1
    while (
        tiles * n_slices * num_r_tiles * split_k < _TARGET_PROGRAMS
        and h_in // (split_k * 2) >= block_k
        and split_k < max_split
    ):
        split_k *= 2
    k_per_split = triton.cdiv(triton.cdiv(h_in, split_k), block_k) * block_k
    alloc = torch.zeros if zero_fill else torch.empty
    out = alloc((split_k, n_slices, T, r_max), dtype=torch.float32, device=x.device)
    if T == 0 or num_segs == 0:
        return out
    a0 = lora_as[0]
    offs = [_elem_offset(a, a0) for a in lora_as] + [0, 0]
    grid = (tiles, split_k * num_r_tiles, n_slices)
    _sgmv_shrink_kernel[grid](
        x,
        a0,
        out,
        seg_indptr,
        seg_slots,
        ranks,
        offs[1],
        offs[2],
        num_segs,
        T,
        h_in,
        r_max,
        k_per_split,
        x.stride(0),
        a0.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        ranks.stride(0),
        NUM_R_TILES=num_r_tiles,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        SEG_BLOCK=_seg_block(num_segs),
        IEEE=x.dtype == torch.float32,
        num_warps=SHRINK_NUM_WARPS,
    )
    return out


def expand(
    y: torch.Tensor,
    partials: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """``y[:, slice cols] += scale * sum_k(partials[k]) @ B.T`` for 1..3 slices, one launch."""
    T = y.shape[0]
    num_segs = seg_slots.shape[0]
    if T == 0 or num_segs == 0:
        return
    n_slices = len(lora_bs)
    r_max = lora_bs[0].shape[2]
    block_m = _block_m(T, num_segs)
    block_r = min(64, max(16, triton.next_power_of_2(r_max)))
    cols = _ColumnPlan(lora_bs, _max_tiles(T, num_segs, block_m), block_m)
    _sgmv_expand_kernel[cols.grid](
        y,
        partials,
        lora_bs[0],
        seg_indptr,
        seg_slots,
        ranks,
        scales,
        cols.b_offs[1],
        cols.b_offs[2],
        num_segs,
        T,
        r_max,
        *cols.widths,
        *cols.cols,
        cols.n_progs[0],
        cols.n_progs[0] + cols.n_progs[1],
        y.stride(0),
        partials.stride(0),
        partials.stride(1),
        partials.stride(2),
        *cols.slot_strides,
        ranks.stride(0),
        scales.stride(0),
        NUM_SPLITS=partials.shape[0],
        NUM_SLICES=n_slices,
        BLOCK_M=block_m,
        BLOCK_N=cols.block_n,
        BLOCK_R=block_r,
        N_PER_PROG=cols.n_per_prog,
        HOIST=r_max <= block_r,
        SEG_BLOCK=_seg_block(num_segs),
        IEEE=y.dtype == torch.float32,
        num_warps=EXPAND_NUM_WARPS,
        # Without hoisting, pipelining the split-K partial loads of the inner rank loop would
        # need more shared memory than the GPU has.
        num_stages=3 if r_max <= block_r else 1,
    )
