"""The expand half of multi-LoRA as device functions that an elementwise kernel calls while it loads
a projection's output (``lora_deferred.py`` says why). ``fused_triton.py``'s RoPE + KV-write and
SiLU·up kernels take the arguments ``lora_args`` builds and, when ``HAS_LORA``, add each column's
delta before using it.

The math is the row-wise expand's (``sgmv_rows_triton.py``): a row's rank vector (the shrink's
split-K partials summed, masked to the slot's rank, scaled, rounded to the activation dtype as the
expand rounds it) multiplied into the row's columns of its adapter's B in registers, in float32,
added to the column and rounded once: the same numbers as the separate expand.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lorafleet.kernels.lora_deferred import PendingLoraDelta

# Elements of B in registers per column tile (columns x rank): as the row-wise expand's chunks.
TILE_ELEMS = int(os.environ.get("LORAFLEET_FUSED_TILE_ELEMS", "4096"))
# Mask B and partial loads by the slot's rank (bytes follow the true rank) or only by the pool's
# (one dependent memory round trip less before the loads; extra bytes when ranks are mixed).
LOAD_BY_RANK = os.environ.get("LORAFLEET_FUSED_BY_RANK", "1") != "0"


@triton.jit
def _row_slot(seg_indptr_ptr, seg_slots_ptr, num_segs, row, SEG_BLOCK: tl.constexpr):
    """Slot of the segment holding ``row``, -1 when none (or its slot is -1): one vector load."""
    offs = tl.arange(0, SEG_BLOCK)
    in_range = offs < num_segs
    starts = tl.load(seg_indptr_ptr + offs, mask=in_range, other=0)
    ends = tl.load(seg_indptr_ptr + offs + 1, mask=in_range, other=0)
    slots = tl.load(seg_slots_ptr + offs, mask=in_range, other=-1)
    hit = in_range & (starts <= row) & (row < ends)
    return tl.max(tl.where(hit, slots, -1), 0)


@triton.jit
def _rank_vector(
    t_row,
    stride_t_split,
    rank,
    scale,
    R_MAX,
    NUM_SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DTYPE: tl.constexpr,
    BY_RANK: tl.constexpr,
):
    r = tl.arange(0, BLOCK_R)
    load = r < R_MAX
    if BY_RANK:
        # Whole aligned runs of 8 so the loads stay vectorised; lanes past the rank are zeroed after.
        load = load & ((r // 8) < (rank + 7) // 8)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for sp in tl.static_range(NUM_SPLITS):
        acc += tl.load(t_row + sp * stride_t_split + r, mask=load, other=0.0)
    return (tl.where(r < rank, acc, 0.0) * scale).to(DTYPE).to(tl.float32)


@triton.jit
def _slice_state(
    row,
    k,
    valid,
    sl,
    tmp_ptr,
    ranks_ptr,
    scales_ptr,
    b_ptr,
    b_off1,
    b_off2,
    sb0,
    sb1,
    sb2,
    R_MAX,
    stride_t_split,
    stride_t_slice,
    stride_t_m,
    stride_rank,
    stride_scale,
    NUM_SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DTYPE: tl.constexpr,
    BY_RANK: tl.constexpr,
):
    """(B of slot ``k`` in slice ``sl``, its rank, the row's rank vector, whether the row has a delta
    here: callers add it to their load mask) for a program whose columns all lie in one slice.
    ``sl`` < 0 (no LoRA on these columns) or a row without an adapter gives rank 0 and no delta, so
    nothing of B is loaded. The slice is picked arithmetically (one-hot ints), so the
    base pointer keeps its alignment and B loads stay vectorised."""
    use = valid & (sl >= 0)
    s = tl.maximum(sl, 0)
    is1 = (s == 1).to(tl.int64)
    is2 = (s == 2).to(tl.int64)
    is0 = 1 - is1 - is2
    rank = tl.where(use, tl.load(ranks_ptr + s * stride_rank + k), 0)
    scale = tl.load(scales_ptr + s * stride_scale + k)
    t_row = tmp_ptr + s * stride_t_slice + row.to(tl.int64) * stride_t_m
    inter = _rank_vector(t_row, stride_t_split, rank, scale, R_MAX, NUM_SPLITS, BLOCK_R, DTYPE, BY_RANK)
    if not BY_RANK:
        inter = tl.where(use, inter, 0.0)
    b_base = b_ptr + (b_off1 * is1 + b_off2 * is2) + k.to(tl.int64) * (sb0 * is0 + sb1 * is1 + sb2 * is2)
    return b_base, rank, inter, use


@triton.jit
def _slice_delta(b_base, n, n_mask, use, rank, inter, R_MAX, BLOCK_R: tl.constexpr, BY_RANK: tl.constexpr):
    """Float32 delta [M, N] of columns ``n`` [M, N] of one slice (``_slice_state``'s outputs)."""
    r = tl.arange(0, BLOCK_R)[None, None, :]
    # The scalar flag as a tensor first: the interpreter mishandles a scalar boolean in a tensor mask.
    n_mask = n_mask & ((n * 0 + use.to(tl.int32)) > 0)
    # Whole aligned runs of 8 so the loads stay vectorised; lanes past the rank are zeroed after.
    load = (r < R_MAX) & n_mask[:, :, None]
    if BY_RANK:
        load = load & ((r // 8) < (rank + 7) // 8)
    bt = tl.load(b_base + n.to(tl.int64)[:, :, None] * R_MAX + r, mask=load, other=0.0)
    bt = tl.where(r < rank, bt.to(tl.float32), 0.0)
    return tl.sum(bt * inter[None, None, :], axis=2)


@triton.jit
def _slice_delta_1d(b_base, n, n_mask, use, rank, inter, R_MAX, BLOCK_R: tl.constexpr, BY_RANK: tl.constexpr):
    """``_slice_delta`` for a vector of columns ``n`` [N]: a 2-D [N, rank] tile of B, as the row-wise
    expand loads it (a 3-D tile with a unit leading dimension was measured 3-5x slower)."""
    r = tl.arange(0, BLOCK_R)[None, :]
    n_mask = n_mask & ((n * 0 + use.to(tl.int32)) > 0)
    load = (r < R_MAX) & n_mask[:, None]
    if BY_RANK:
        load = load & ((r // 8) < (rank + 7) // 8)
    bt = tl.load(b_base + n.to(tl.int64)[:, None] * R_MAX + r, mask=load, other=0.0)
    bt = tl.where(r < rank, bt.to(tl.float32), 0.0)
    return tl.sum(bt * inter[None, :], axis=1)


def _elem_offset(t: torch.Tensor, base: torch.Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise ValueError("lora_b: slice stacks must be aligned to their element size")
    return delta // t.element_size()


def block_r(pending: PendingLoraDelta | None) -> int:
    """Width of the rank vector (the whole rank in one vector; 1 without LoRA)."""
    if pending is None:
        return 1
    return triton.next_power_of_2(max(int(pending.lora_bs[0].shape[2]), 8))


def part_slices(pending: PendingLoraDelta, parts: Sequence[tuple[int, int]]) -> tuple[int, ...] | None:
    """For each part (first column, width) of a consumer's input, the slice of ``pending`` that is
    exactly that part, or -1 when none is; None when a slice is not exactly one part (the consumer
    then applies the delta first)."""
    found = [-1] * len(parts)
    for s, (col, width) in enumerate(zip(pending.cols, pending.widths)):
        if (col, width) not in parts:
            return None
        found[parts.index((col, width))] = s
    return tuple(found)


def lora_args(
    pending: PendingLoraDelta | None, like: torch.Tensor, slices: Sequence[int] = ()
) -> tuple[tuple, dict]:
    """(positional, constexpr) kernel arguments for ``pending``, whose slice ``slices[i]`` feeds the
    consumer's part i (``part_slices``); with None, placeholders (``like`` for the pointers) that a
    kernel compiled with HAS_LORA=False never reads."""
    part = [*slices, -1, -1, -1][:3]
    if pending is None:
        return (like,) * 6 + (0,) * 12, dict(
            HAS_LORA=False,
            LORA_SPLITS=1,
            LORA_BLOCK_R=1,
            LORA_SEG_BLOCK=16,
            LORA_BY_RANK=True,
            PART0=-1,
            PART1=-1,
            PART2=-1,
        )
    bs = pending.lora_bs
    n = len(bs)
    b0 = bs[0]
    offs = [_elem_offset(b, b0) for b in bs] + [0, 0]
    strides = [b.stride(0) for b in bs] + [0, 0]
    p, ranks, scales = pending.partials, pending.ranks, pending.scales
    num_segs = pending.seg_slots.shape[0]
    seg_block = 16
    while seg_block < num_segs:
        seg_block *= 4
    positional = (
        p,
        b0,
        pending.seg_indptr,
        pending.seg_slots,
        ranks,
        scales,
        num_segs,
        b0.shape[2],
        offs[1],
        offs[2],
        *strides[:3],
        p.stride(0),
        p.stride(1),
        p.stride(2),
        ranks.stride(0) if n > 1 else 0,
        scales.stride(0) if n > 1 else 0,
    )
    constexprs = dict(
        HAS_LORA=True,
        LORA_SPLITS=int(p.shape[0]),
        LORA_BLOCK_R=block_r(pending),
        LORA_SEG_BLOCK=seg_block,
        LORA_BY_RANK=LOAD_BY_RANK,
        PART0=part[0],
        PART1=part[1],
        PART2=part[2],
    )
    return positional, constexprs
