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

import torch
import triton
import triton.language as tl

from lorafleet.kernels.lora_deferred import PendingLoraDelta

# Elements of B in registers per column tile (columns x rank): as the row-wise expand's chunks.
TILE_ELEMS = 4096


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
):
    r = tl.arange(0, BLOCK_R)
    # Whole aligned runs of 8 so the loads stay vectorised; lanes past the rank are zeroed after.
    load = ((r // 8) < (rank + 7) // 8) & (r < R_MAX)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for sp in tl.static_range(NUM_SPLITS):
        acc += tl.load(t_row + sp * stride_t_split + r, mask=load, other=0.0)
    return (tl.where(r < rank, acc, 0.0) * scale).to(DTYPE).to(tl.float32)


@triton.jit
def _lora_row(
    row,
    tmp_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    scales_ptr,
    num_segs,
    R_MAX,
    stride_t_split,
    stride_t_slice,
    stride_t_m,
    stride_rank,
    stride_scale,
    NUM_SPLITS: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """(slot, rank and rank vector of each of 3 slices) of ``row``; rank 0 for a row without an
    adapter and for absent slices, so no B is loaded for them."""
    slot = _row_slot(seg_indptr_ptr, seg_slots_ptr, num_segs, row, SEG_BLOCK)
    valid = slot >= 0
    k = tl.maximum(slot, 0)
    t_row = tmp_ptr + row.to(tl.int64) * stride_t_m
    rank0 = tl.where(valid, tl.load(ranks_ptr + k), 0)
    inter0 = _rank_vector(
        t_row, stride_t_split, rank0, tl.load(scales_ptr + k), R_MAX, NUM_SPLITS, BLOCK_R, DTYPE
    )
    rank1 = rank0 * 0
    inter1 = inter0 * 0.0
    rank2 = rank1
    inter2 = inter1
    if NUM_SLICES >= 2:
        rank1 = tl.where(valid, tl.load(ranks_ptr + stride_rank + k), 0)
        inter1 = _rank_vector(
            t_row + stride_t_slice,
            stride_t_split,
            rank1,
            tl.load(scales_ptr + stride_scale + k),
            R_MAX,
            NUM_SPLITS,
            BLOCK_R,
            DTYPE,
        )
    if NUM_SLICES >= 3:
        rank2 = tl.where(valid, tl.load(ranks_ptr + 2 * stride_rank + k), 0)
        inter2 = _rank_vector(
            t_row + 2 * stride_t_slice,
            stride_t_split,
            rank2,
            tl.load(scales_ptr + 2 * stride_scale + k),
            R_MAX,
            NUM_SPLITS,
            BLOCK_R,
            DTYPE,
        )
    return k, rank0, rank1, rank2, inter0, inter1, inter2


@triton.jit
def _lora_delta(
    ycols,
    cmask,
    k,
    rank0,
    rank1,
    rank2,
    inter0,
    inter1,
    inter2,
    b_ptr,
    b_off1,
    b_off2,
    sb0,
    sb1,
    sb2,
    col0,
    col1,
    col2,
    w0,
    w1,
    w2,
    R_MAX,
    BLOCK_R: tl.constexpr,
):
    """Float32 delta [M, N] of the y columns ``ycols`` [M, N] (masked by ``cmask``) of one row:
    the slice holding each column picks its B row, rank and rank vector."""
    in0 = cmask & (ycols >= col0) & (ycols < col0 + w0)
    in1 = cmask & (ycols >= col1) & (ycols < col1 + w1)
    in2 = cmask & (ycols >= col2) & (ycols < col2 + w2)
    kk = k.to(tl.int64)
    base = tl.where(
        in0,
        kk * sb0 + (ycols - col0).to(tl.int64) * R_MAX,
        tl.where(
            in1,
            b_off1 + kk * sb1 + (ycols - col1).to(tl.int64) * R_MAX,
            b_off2 + kk * sb2 + (ycols - col2).to(tl.int64) * R_MAX,
        ),
    )
    rank = tl.where(in0, rank0, tl.where(in1, rank1, tl.where(in2, rank2, 0)))[:, :, None]
    r = tl.arange(0, BLOCK_R)[None, None, :]
    load = ((r // 8) < (rank + 7) // 8) & (r < R_MAX)
    bt = tl.load(b_ptr + base[:, :, None] + r, mask=load, other=0.0)
    inter = tl.where(
        in0[:, :, None],
        inter0[None, None, :],
        tl.where(in1[:, :, None], inter1[None, None, :], inter2[None, None, :]),
    )
    bt = tl.where(r < rank, bt.to(tl.float32), 0.0)
    return tl.sum(bt * inter, axis=2)


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


def lora_args(pending: PendingLoraDelta | None, like: torch.Tensor) -> tuple[tuple, dict]:
    """(positional, constexpr) kernel arguments for ``pending``; with None, placeholders (``like``
    for the pointers) that a kernel compiled with HAS_LORA=False never reads."""
    if pending is None:
        return (like,) * 6 + (0,) * 18, dict(
            HAS_LORA=False, LORA_SPLITS=1, LORA_SLICES=1, LORA_BLOCK_R=1, LORA_SEG_BLOCK=16
        )
    bs = pending.lora_bs
    n = len(bs)
    b0 = bs[0]
    offs = [_elem_offset(b, b0) for b in bs] + [0, 0]
    strides = [b.stride(0) for b in bs] + [0, 0]
    cols = [*pending.cols, 0, 0]
    widths = [*pending.widths, 0, 0]
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
        *cols[:3],
        *widths[:3],
        p.stride(0),
        p.stride(1),
        p.stride(2),
        ranks.stride(0) if n > 1 else 0,
        scales.stride(0) if n > 1 else 0,
    )
    constexprs = dict(
        HAS_LORA=True,
        LORA_SPLITS=int(p.shape[0]),
        LORA_SLICES=n,
        LORA_BLOCK_R=block_r(pending),
        LORA_SEG_BLOCK=seg_block,
    )
    return positional, constexprs
