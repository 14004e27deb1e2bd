"""Triton SGMV kernels: shrink (x @ A[slot].T) and multi-slice expand (+= tmp @ B[slot].T).

Work decomposition. Rows are grouped by adapter into segments (``seg_indptr``). Each segment is cut
into row tiles of BLOCK_M; tile ``t`` of the flattened list is found inside the kernel from a cumsum
over the segments' tile counts, so the grid is sized from shapes alone (at most ``S + T/BLOCK_M``
tiles) and nothing is read back to the host: the launch is CUDA-graph capturable.

Shrink splits h_in over ``SPLIT_K`` programs and writes float32 partials
``[SPLIT_K, n_slices, T, r_max]`` without atomics; expand sums those partials while loading them,
so no zero-fill or reduction launch is needed. Both kernels stop at each slot's true rank: rows of A
past it are never loaded, columns of B only up to the end of the rank's 8-entry run (see
``_rank_masks``), and expand's rank loop runs only to the true rank.

On Hopper, expand is launched as shrink's programmatic dependent (``USE_PDL``): shrink lets it start
at once, and expand loads the segment metadata, its chunk of B and y, none of which shrink writes,
before ``gdc_wait`` blocks it until shrink's partials are complete and visible.

Fused projections (q|k|v, gate|up) are up to three *slices*, each with its own A/B stack, rank,
scale and output width. Their stacks are separate allocations; the kernel addresses slices 1 and 2
as element offsets from slice 0's pointer (GPU memory is one flat address space), which keeps one
launch for all slices without a device-side pointer table.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_to_segment(
    seg_indptr_ptr, seg_slots_ptr, num_segs, tile_id, T, BLOCK_M: tl.constexpr, SEG_BLOCK: tl.constexpr
):
    """Map a flat tile id to (segment, its slot, first row of the tile, end row of the segment).

    The slots are loaded as a vector beside the indptr rather than indexed afterwards, which saves
    one dependent memory round trip per program (they dominate small decode batches).
    """
    offs = tl.arange(0, SEG_BLOCK)
    in_range = offs < num_segs
    starts = tl.load(seg_indptr_ptr + offs, mask=in_range, other=0)
    ends = tl.load(seg_indptr_ptr + offs + 1, mask=in_range, other=0)
    slots = tl.load(seg_slots_ptr + offs, mask=in_range, other=-1)
    # Clamp so a malformed indptr can never address rows outside [0, T).
    starts = tl.minimum(tl.maximum(starts, 0), T)
    ends = tl.maximum(tl.minimum(ends, T), starts)
    n_tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(n_tiles, 0)
    seg = tl.sum((cum <= tile_id).to(tl.int32), 0)
    sel = offs == seg
    seg_start = tl.sum(tl.where(sel, starts, 0), 0)
    seg_end = tl.sum(tl.where(sel, ends, 0), 0)
    slot = tl.sum(tl.where(sel, slots, 0), 0)
    first_tile = tl.sum(tl.where(sel, cum - n_tiles, 0), 0)
    row_start = seg_start + (tile_id - first_tile) * BLOCK_M
    return seg, slot, row_start, seg_end


@triton.jit
def _rank_masks(r, rank, R_MAX, GRANULE: tl.constexpr):
    """(exact, load) masks for rank positions ``r``: exact is ``r < rank``; load extends it to whole
    aligned runs of GRANULE entries (within R_MAX).

    A mask that may end at any element forces the compiler into one scalar load per element, which
    starves these memory-bound kernels; a mask constant over aligned runs lets it issue 16-byte
    vector loads. The lanes between the rank and the end of its run may hold garbage (even NaN), so
    loaded values are zeroed with the exact mask before use. They share their memory sector with
    valid entries, so the bytes moved still follow the true rank.
    """
    exact = r < rank
    load = ((r // GRANULE) < (rank + GRANULE - 1) // GRANULE) & (r < R_MAX)
    return exact, load


@triton.jit
def _dot(a, b_t, IEEE: tl.constexpr):
    """a @ b_t.T in float32 (IEEE for float32 inputs, where TF32 would lose precision)."""
    if IEEE:
        return tl.dot(a, tl.trans(b_t), input_precision="ieee")
    return tl.dot(a, tl.trans(b_t))


@triton.jit
def _load_b(b_base, n, n_mask, r, r_mask, r_load, R_MAX):
    """B[n, r] with columns past the rank zeroed: [BLOCK_N, BLOCK_R]."""
    bt = tl.load(
        b_base + n.to(tl.int64)[:, None] * R_MAX + r[None, :],
        mask=n_mask[:, None] & r_load[None, :],
        other=0.0,
    )
    return tl.where(r_mask[None, :], bt, 0.0)


@triton.jit
def _sum_partials(
    t_rows,
    r,
    r_mask,
    r_load,
    row_mask,
    scale,
    stride_split,
    dtype: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """scale * sum over split-K partials of tmp[rows, r], cast to the output dtype: [BLOCK_M, BLOCK_R]."""
    inter = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    mask = row_mask[:, None] & r_load[None, :]
    for sp in tl.static_range(NUM_SPLITS):
        inter += tl.load(t_rows + sp * stride_split + r[None, :], mask=mask, other=0.0)
    return (tl.where(r_mask[None, :], inter, 0.0) * scale).to(dtype)


@triton.jit
def _add_to_y(y_rows, n, n_mask, row_mask, acc):
    y_mask = row_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_rows + n[None, :], mask=y_mask, other=0.0)
    tl.store(y_rows + n[None, :], (yt.to(tl.float32) + acc).to(y_rows.dtype.element_ty), mask=y_mask)


@triton.jit
def _select_slice(nid, nt0, nt01, NUM_SLICES: tl.constexpr):
    """Slice of a flat column-program id, as one-hot ints so per-slice scalars are picked
    arithmetically (they keep one type whatever Triton specialised them to)."""
    sl = 0
    if NUM_SLICES >= 2:
        sl += (nid >= nt0).to(tl.int32)
    if NUM_SLICES >= 3:
        sl += (nid >= nt01).to(tl.int32)
    is1 = (sl == 1).to(tl.int32)
    is2 = (sl == 2).to(tl.int32)
    return sl, 1 - is1 - is2, is1, is2


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    a_off1,
    a_off2,
    num_segs,
    T,
    H_IN,
    R_MAX,
    K_PER_SPLIT,
    stride_xm,
    stride_a_slot,
    stride_o_split,
    stride_o_slice,
    stride_o_m,
    stride_rank_slice,
    NUM_R_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    IEEE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        # Let expand's programs start loading B and y while this grid still runs.
        tl.extra.cuda.gdc_launch_dependents()
    tile_id = tl.program_id(0)
    split = tl.program_id(1) // NUM_R_TILES
    r_tile = tl.program_id(1) % NUM_R_TILES
    sl = tl.program_id(2)
    seg, slot, row_start, seg_end = _tile_to_segment(
        seg_indptr_ptr, seg_slots_ptr, num_segs, tile_id, T, BLOCK_M, SEG_BLOCK
    )
    if seg >= num_segs:
        return
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + sl * stride_rank_slice + slot)
    r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < rank
    if r_tile * BLOCK_R >= rank:
        return
    a_base = a_ptr + slot.to(tl.int64) * stride_a_slot
    if sl == 1:
        a_base += a_off1
    if sl == 2:
        a_base += a_off2
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < seg_end
    k_start = split * K_PER_SPLIT
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    a_rows = a_base + r[:, None] * H_IN
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k = k_start + kk + tl.arange(0, BLOCK_K)
        k_mask = k < H_IN
        xt = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_rows + k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += _dot(xt, at, IEEE)
    out = out_ptr + split * stride_o_split + sl * stride_o_slice
    out_ptrs = out + rows.to(tl.int64)[:, None] * stride_o_m + r[None, :]
    # Columns past the rank hold zeros (their A rows were not loaded); storing them up to R_MAX keeps
    # the store vectorised.
    tl.store(out_ptrs, acc, mask=row_mask[:, None] & (r < R_MAX)[None, :])


@triton.jit
def _sgmv_expand_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_PER_PROG: tl.constexpr,
    HOIST: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    IEEE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tile_id = tl.program_id(0)
    nid = tl.program_id(1)
    sl, is0, is1, is2 = _select_slice(nid, nt0, nt01, NUM_SLICES)
    width = w0 * is0 + w1 * is1 + w2 * is2
    col = col0 * is0 + col1 * is1 + col2 * is2
    n_tile = nid - nt0 * is1 - nt01 * is2
    stride_b_slot = stride_b_slot0 * is0 + stride_b_slot1 * is1 + stride_b_slot2 * is2

    seg, slot, row_start, seg_end = _tile_to_segment(
        seg_indptr_ptr, seg_slots_ptr, num_segs, tile_id, T, BLOCK_M, SEG_BLOCK
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

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < seg_end
    t_rows = tmp_ptr + sl * stride_t_slice + rows.to(tl.int64)[:, None] * stride_t_m
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + col
    n_begin = n_tile * N_PER_PROG
    n_stop = tl.minimum(n_begin + N_PER_PROG, width)
    dtype = y_ptr.dtype.element_ty
    if HOIST:
        # The whole rank fits one tile: sum the split-K partials once, reuse for every column chunk.
        r = tl.arange(0, BLOCK_R)
        r_mask, r_load = _rank_masks(r, rank, R_MAX, 8)
        if USE_PDL:
            # Launched as shrink's programmatic dependent, with one column chunk per program: load
            # everything shrink does not write (B, y) before waiting for it, so the loads overlap it.
            tl.static_assert(N_PER_PROG == BLOCK_N, "programmatic dependent launch needs one chunk")
            n = n_begin + tl.arange(0, BLOCK_N)
            n_mask = n < n_stop
            bt = _load_b(b_base, n, n_mask, r, r_mask, r_load, R_MAX)
            y_mask = row_mask[:, None] & n_mask[None, :]
            yt = tl.load(y_rows + n[None, :], mask=y_mask, other=0.0)
            tl.extra.cuda.gdc_wait()
        inter_lp = _sum_partials(
            t_rows, r, r_mask, r_load, row_mask, scale, stride_t_split, dtype, NUM_SPLITS, BLOCK_M, BLOCK_R
        )
        if USE_PDL:
            acc = _dot(inter_lp, bt, IEEE)
            tl.store(y_rows + n[None, :], (yt.to(tl.float32) + acc).to(dtype), mask=y_mask)
        else:
            for n0 in range(n_begin, n_stop, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                n_mask = n < n_stop
                bt = _load_b(b_base, n, n_mask, r, r_mask, r_load, R_MAX)
                _add_to_y(y_rows, n, n_mask, row_mask, _dot(inter_lp, bt, IEEE))
    else:
        tl.static_assert(not USE_PDL, "programmatic dependent launch needs the hoisted path")
        for n0 in range(n_begin, n_stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < n_stop
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_mask, r_load = _rank_masks(r, rank, R_MAX, 8)
                inter_lp = _sum_partials(
                    t_rows,
                    r,
                    r_mask,
                    r_load,
                    row_mask,
                    scale,
                    stride_t_split,
                    dtype,
                    NUM_SPLITS,
                    BLOCK_M,
                    BLOCK_R,
                )
                acc += _dot(inter_lp, _load_b(b_base, n, n_mask, r, r_mask, r_load, R_MAX), IEEE)
            _add_to_y(y_rows, n, n_mask, row_mask, acc)
