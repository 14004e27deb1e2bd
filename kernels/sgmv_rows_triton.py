"""Row-wise Triton SGMV expand for batches whose segments hold about one row each (distinct decode).

The tile expand of sgmv_triton.py gives each program a 16-row tile so that ``tl.dot`` can use the
tensor cores; with one row per segment, 15 of those rows are masked, and the operands still go
through shared memory and a layout change before each tiny MMA. Here a program owns one row and a
chunk of its output columns: it multiplies the row's rank vector into that chunk of its adapter's B
in registers and reduces over the rank, so its time is its loads, and a chunk can be wider.

It reads the shrink's partial sums ``[SPLIT_K, n_slices, T, r_max]`` (float32, summed over splits
here), the layout the tile shrink writes. Rows are found as the tile kernels find tiles
(``_tile_to_segment`` with one-row tiles): program ``t`` takes the t-th row that lies in a segment,
so rows outside every segment, and segments of slot -1, are never touched. (A row-wise shrink was
measured too and lost to the tile shrink in every decode case: docs/benchmarks.md.)
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorafleet.kernels.sgmv_triton import _rank_masks, _select_slice, _tile_to_segment


@triton.jit
def _sgmv_expand_rows_kernel(
    y_ptr,
    tmp_ptr,
    b_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    scales_ptr,
    b_off1,
    b_off2,
    num_segs,
    T,
    R_MAX,
    w0,
    w1,
    w2,
    col0,
    col1,
    col2,
    nt0,
    nt01,
    stride_ym,
    stride_t_split,
    stride_t_slice,
    stride_t_m,
    stride_b_slot0,
    stride_b_slot1,
    stride_b_slot2,
    stride_rank_slice,
    stride_scale_slice,
    NUM_SPLITS: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    USE_PDL: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
):
    nid = tl.program_id(1)
    sl, is0, is1, is2 = _select_slice(nid, nt0, nt01, NUM_SLICES)
    width = w0 * is0 + w1 * is1 + w2 * is2
    col = col0 * is0 + col1 * is1 + col2 * is2
    n_tile = nid - nt0 * is1 - nt01 * is2
    stride_b_slot = stride_b_slot0 * is0 + stride_b_slot1 * is1 + stride_b_slot2 * is2
    seg, slot, row, _ = _tile_to_segment(
        seg_indptr_ptr, seg_slots_ptr, num_segs, tl.program_id(0), T, 1, SEG_BLOCK
    )
    if seg >= num_segs:
        return
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + sl * stride_rank_slice + slot)
    scale = tl.load(scales_ptr + sl * stride_scale_slice + slot)
    b_base = b_ptr + slot.to(tl.int64) * stride_b_slot
    if sl == 1:
        b_base += b_off1
    if sl == 2:
        b_base += b_off2
    r = tl.arange(0, BLOCK_R)
    r_mask, r_load = _rank_masks(r, rank, R_MAX, 8)
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < width
    y_row = y_ptr + row.to(tl.int64) * stride_ym + col
    # B and y are not written by shrink: with programmatic dependent launch they load while it runs.
    bt = tl.load(
        b_base + n.to(tl.int64)[:, None] * R_MAX + r[None, :],
        mask=n_mask[:, None] & r_load[None, :],
        other=0.0,
    )
    yv = tl.load(y_row + n, mask=n_mask, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    t_row = tmp_ptr + sl * stride_t_slice + row.to(tl.int64) * stride_t_m
    inter = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for sp in tl.static_range(NUM_SPLITS):
        inter += tl.load(t_row + sp * stride_t_split + r, mask=r_load, other=0.0)
    # Rounded to y's dtype first, as the tile kernel's dot operand is, so both paths agree.
    inter = (tl.where(r_mask, inter, 0.0) * scale).to(y_ptr.dtype.element_ty).to(tl.float32)
    bt = tl.where(r_mask[None, :], bt.to(tl.float32), 0.0)
    acc = tl.sum(bt * inter[None, :], axis=1)
    tl.store(y_row + n, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=n_mask)
