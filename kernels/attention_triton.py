"""Triton paged attention that reads the KV cache in place: decode (split-K + merge) and varlen prefill.

Cache layout (one layer): ``[num_blocks, BLOCK_SIZE, Hkv, D]``. A token at position ``p`` of
sequence ``b`` lives in page ``block_tables[b, p // BLOCK_SIZE]`` at offset ``p % BLOCK_SIZE``. The
kernels walk the context in tiles of BLOCK_N tokens (several pages when pages are small) and gather
one page id per token from the block table: duplicate ids within a warp cost one transaction, the
K/V rows themselves are D contiguous elements, so loads stay 16-byte vectors along D whatever the
page size, and no page outside a sequence's context (-1 padding) is ever read.

Decode. Program ``(b, kv_head, split)`` serves every query head of its GQA group, so each K/V tile is
loaded once for the group. The group is padded to 16 rows and both products run on tensor cores,
MHA (group 1) included: the 15 wasted rows cost nothing in this memory-bound loop, while the
CUDA-core multiply-sum alternative (``attention_launch.DOT_MIN_GROUP``) measured 2.4x slower on an H200.
The context (after the sliding-window cut) is cut into NUM_SPLITS equal shares of whole tiles,
computed in the kernel from the actual ``seq_lens``: the grid depends on shapes only, so a CUDA graph
replays it with new lengths. With NUM_SPLITS > 1 each program writes its float32 partial output
(normalised within the split) and log-sum-exp, and a small kernel merges them.

Prefill (variable-length rows, possibly over a cached context, decode rows mixed in). Program
``(q_block, kv_head)`` takes BLOCK_Q query rows of one sequence times the G heads of the group, as one
``BLOCK_Q * G_PAD``-row tile. Query blocks are numbered ``query_start_loc[b] // BLOCK_Q + b + i``
(monotonic in b, and at most ``T // BLOCK_Q + B`` of them), so the grid comes from shapes and each
program finds its sequence with one vector compare over ``query_start_loc``.

Softmax runs in float32 in base 2 (``scale * log2(e)`` folded into the scores). A row that sees no key
(padded rows, seq_len 0) gets zeros, never NaN. Launch parameters live in ``attention_launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scores(q, k, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """q [G_PAD, BLOCK_D] x k [BLOCK_N, BLOCK_D] -> [G_PAD, BLOCK_N] float32."""
    if USE_DOT:
        if IEEE:
            return tl.dot(q, tl.trans(k), input_precision="ieee")
        return tl.dot(q, tl.trans(k))
    # One query row (MHA decode): multiply-sum on CUDA cores, no padded MMA.
    return tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)


@triton.jit
def _weighted_values(p, v, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """p [G_PAD, BLOCK_N] float32 x v [BLOCK_N, BLOCK_D] -> [G_PAD, BLOCK_D] float32."""
    if USE_DOT:
        if IEEE:
            return tl.dot(p.to(v.dtype), v, input_precision="ieee")
        return tl.dot(p.to(v.dtype), v)
    return tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)


@triton.jit
def _load_kv_tile(
    k_ptr,
    v_ptr,
    bt_row,
    kv_head,
    pos,
    tok_valid,
    d,
    stride_page,
    stride_tok,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """K and V rows of the tokens at ``pos`` ([BLOCK_N]); invalid tokens read nothing and give 0."""
    page = tl.load(bt_row + pos // BLOCK_SIZE, mask=tok_valid, other=0)
    # int64: a layer's cache can exceed 2**31 elements.
    row = page.to(tl.int64) * stride_page + (pos % BLOCK_SIZE) * stride_tok + kv_head * HEAD_DIM
    offs = row[:, None] + d[None, :]
    if EVEN_D:
        mask = tok_valid[:, None]
    else:
        mask = tok_valid[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(qk, valid, m_i, l_i, acc, v, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """Fold one tile of base-2 scores (already scaled) into the running max / sum / accumulator."""
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row with no valid key so far keeps m = -inf; subtracting 0 instead keeps exp2 from NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _weighted_values(p, v, USE_DOT, IEEE)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qk_scale,
    window,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_bt,
    stride_page,
    stride_tok,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_DOT: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # Keys at positions [lo, seq_len): the query sits at seq_len - 1.
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    first_tile = lo // BLOCK_N
    n_tiles = tl.cdiv(seq_len, BLOCK_N) - first_tile
    tiles_per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t_begin = first_tile + split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, first_tile + n_tiles)

    g = tl.arange(0, G_PAD)
    g_valid = g < GROUP
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, BLOCK_D), dtype=tl.float32)
    for t in range(t_begin, t_end):
        pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        tok_valid = (pos >= lo) & (pos < seq_len)
        k, v = _load_kv_tile(
            k_ptr,
            v_ptr,
            bt_row,
            kv_head,
            pos,
            tok_valid,
            d,
            stride_page,
            stride_tok,
            BLOCK_SIZE,
            HEAD_DIM,
            BLOCK_D == HEAD_DIM,
        )
        qk = _scores(q, k, USE_DOT, IEEE) * qk_scale
        m_i, l_i, acc = _online_softmax_step(qk, tok_valid[None, :], m_i, l_i, acc, v, USE_DOT, IEEE)

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key seen: acc = 0, so 0
        tl.store(
            out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=g_valid[:, None] & d_valid[None, :],
        )
    else:
        # Partials [B, Hq, NUM_SPLITS, HEAD_DIM] (normalised per split) and their log-sum-exp
        # [B, Hq, NUM_SPLITS] (base 2). An empty split stores 0 and lse = -inf: weight 0 in the merge.
        row = (b * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        has = l_i > 0
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_valid)
        tl.store(
            part_o_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
            acc / tl.where(has, l_i, 1.0)[:, None],
            mask=g_valid[:, None] & d_valid[None, :],
        )


@triton.jit
def _decode_merge_kernel(
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """out[b, h] = sum_s 2^lse_s * o_s / sum_s 2^lse_s over the splits' normalised partials o_s."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    row = (b * NUM_HEADS + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    # seq_len 0: every split is empty (lse all -inf); the weights are then all 0 and so is the output.
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    o = tl.load(
        part_o_ptr + (row + s).to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
        mask=(s < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    denom = tl.sum(w, 0)
    num = tl.sum(o * w[:, None], 0)
    res = num / tl.where(denom > 0, denom, 1.0)  # all splits empty: num = 0
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d,
        res.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_seqs,
    qk_scale,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_page,
    stride_tok,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Sequence b owns query blocks [qsl[b] // BLOCK_Q + b, ... + cdiv(qlen_b, BLOCK_Q)); find the last
    # b whose first block is <= ours with one vector compare (no dependent search loop).
    sb = tl.arange(0, SEQ_BLOCK)
    starts = tl.load(query_start_loc_ptr + sb, mask=sb < num_seqs, other=0)
    first_blocks = tl.where(sb < num_seqs, starts // BLOCK_Q + sb, 2147483647)
    b = tl.sum((first_blocks <= qblock).to(tl.int32), 0) - 1
    if b < 0:  # blocks before the first sequence's (query_start_loc[0] > 0)
        return
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    local = qblock - (q_start // BLOCK_Q + b)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)

    # Tile rows m = (query row i, group head g), i-major.
    m = tl.arange(0, BLOCK_Q * G_PAD)
    i = local * BLOCK_Q + m // G_PAD
    g = m % G_PAD
    row_valid = (i < q_len) & (g < GROUP)
    heads = kv_head * GROUP + g
    token = (q_start + i).to(tl.int64)
    pos_q = seq_len - q_len + i
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    # Keys any row of this block can see: [lo, hi).
    first_pos = seq_len - q_len + local * BLOCK_Q
    last_pos = seq_len - q_len + tl.minimum(local * BLOCK_Q + BLOCK_Q, q_len) - 1
    hi = tl.minimum(last_pos + 1, seq_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full((BLOCK_Q * G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q * G_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * G_PAD, BLOCK_D), dtype=tl.float32)
    for t in range(lo // BLOCK_N, tl.cdiv(hi, BLOCK_N)):
        pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        tok_valid = (pos >= lo) & (pos < hi)
        k, v = _load_kv_tile(
            k_ptr,
            v_ptr,
            bt_row,
            kv_head,
            pos,
            tok_valid,
            d,
            stride_page,
            stride_tok,
            BLOCK_SIZE,
            HEAD_DIM,
            BLOCK_D == HEAD_DIM,
        )
        qk = _scores(q, k, True, IEEE) * qk_scale
        valid = tok_valid[None, :] & (pos[None, :] <= pos_q[:, None])
        if USE_WINDOW:
            valid &= pos[None, :] > pos_q[:, None] - window
        m_i, l_i, acc = _online_softmax_step(qk, valid, m_i, l_i, acc, v, True, IEEE)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key seen: acc = 0, so 0
    tl.store(
        out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )
