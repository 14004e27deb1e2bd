"""Paged causal attention in plain torch (the CPU path; the GPU uses it until its kernel lands).

Each step writes the new rows' K/V into the cache at ``batch.slot_mapping`` and then lets every
query row attend over its sequence's whole context, read back through ``batch.block_tables``. Prefill
chunks on top of an existing context and single decode tokens go through the same code: a group of
sequences has its rows scattered into a padded ``[b, max_q]`` grid and its contexts gathered into a
padded ``[b, ceil(max_context / block_size) * block_size]`` grid, and a mask built from the positions
keeps every query to keys at or before its own position (and inside a sliding window if any).
A decode-only step reads no device values back to the host, so it can run under CUDA-graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafleet.worker.batch import BatchLayout


@dataclass
class AttentionGroup:
    """Sequences attended together in one padded call, with the index tensors that call needs."""

    rows: torch.Tensor | None  # [n] int64 batch rows of the group, None = every row in order
    row_seq: torch.Tensor  # [n] int64, group-local sequence index of each row
    row_in_seq: torch.Tensor  # [n] int64, index of the row among its sequence's rows this step
    block_ids: torch.Tensor  # [b, n_blocks] int64, padded entries point at block 0 (masked out)
    mask: torch.Tensor  # [b, 1, max_q, n_blocks * block_size] bool, True = attend
    num_seqs: int
    max_query_len: int


@dataclass
class AttentionMetadata:
    """Per-step index tensors shared by every layer (built once per forward)."""

    row_seq_lens: torch.Tensor  # [T] int64, context length of each row's sequence
    slot_mapping: torch.Tensor  # [T] int64
    groups: list[AttentionGroup]


def build_metadata(
    batch: BatchLayout, block_size: int, sliding_window: int | None = None
) -> AttentionMetadata:
    """Index tensors and causal masks of one step's batch.

    A decode-only batch is one group (built from device tensors alone, so it can be captured in a
    CUDA graph). A batch with prefill chunks is split so padding stays small: all decode rows in one
    group, each prefill chunk in its own, which bounds the padded grid by the longest single chunk.
    """
    device = batch.input_ids.device
    num_tokens, num_seqs = batch.num_tokens, batch.num_seqs
    if num_tokens == 0 or num_seqs == 0:
        raise ValueError("batch: an empty batch has nothing to attend")
    if batch.max_context_len < 1 or batch.max_query_len < 1:
        raise ValueError(
            f"batch: max_context_len {batch.max_context_len} and max_query_len {batch.max_query_len} "
            "must be >= 1"
        )
    n_blocks = -(-batch.max_context_len // block_size)
    if batch.block_tables.shape[1] < n_blocks:
        raise ValueError(
            f"batch: block_tables has {batch.block_tables.shape[1]} columns but a context of "
            f"{batch.max_context_len} tokens needs {n_blocks} blocks of {block_size}"
        )
    rows = torch.arange(num_tokens, device=device, dtype=torch.int64)
    starts = batch.query_start_loc.to(device=device, dtype=torch.int64)
    row_seq = torch.searchsorted(starts[1:].contiguous(), rows, right=True)
    seq_lens = batch.seq_lens.to(device=device, dtype=torch.int64)
    positions = batch.positions.to(torch.int64)
    block_tables = batch.block_tables.to(torch.int64)
    meta = AttentionMetadata(seq_lens[row_seq], batch.slot_mapping.to(torch.int64), [])
    qlens, ctx = batch.query_lens, batch.context_lens
    batch_starts = [0]  # host copy of query_start_loc (from host data: no device read)
    for q in qlens:
        batch_starts.append(batch_starts[-1] + q)

    def group(seq_ids: list[int] | None, max_q: int, max_ctx: int) -> AttentionGroup:
        if seq_ids is None:
            g_rows, g_row_seq, g_row_in_seq = None, row_seq, rows - starts[row_seq]
            g_seqs = slice(None)
        elif max_q == 1:  # decode rows: one per sequence
            g_rows = torch.tensor([batch_starts[b] for b in seq_ids], device=device)
            g_row_seq = torch.arange(len(seq_ids), device=device)
            g_row_in_seq = torch.zeros_like(g_row_seq)
            g_seqs = torch.tensor(seq_ids, device=device)
        else:  # one prefill chunk
            (b,) = seq_ids
            g_rows = torch.arange(batch_starts[b], batch_starts[b] + max_q, device=device)
            g_row_seq = torch.zeros(max_q, dtype=torch.int64, device=device)
            g_row_in_seq = torch.arange(max_q, device=device)
            g_seqs = slice(b, b + 1)
        g_pos = positions if g_rows is None else positions[g_rows]
        nb = -(-max_ctx // block_size)
        b_count = num_seqs if seq_ids is None else len(seq_ids)
        # Padding rows take position 0: they see key 0 only (always valid), so no row is fully masked.
        q_pos = torch.zeros(b_count, max_q, dtype=torch.int64, device=device)
        q_pos[g_row_seq, g_row_in_seq] = g_pos
        k_pos = torch.arange(nb * block_size, device=device, dtype=torch.int64)
        lens = seq_lens[g_seqs]
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < lens[:, None, None])
        if sliding_window is not None:
            mask &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window
        return AttentionGroup(
            rows=g_rows,
            row_seq=g_row_seq,
            row_in_seq=g_row_in_seq,
            block_ids=block_tables[g_seqs, :nb].clamp(min=0),
            mask=mask[:, None],
            num_seqs=b_count,
            max_query_len=max_q,
        )

    if batch.max_query_len == 1:
        meta.groups.append(group(None, 1, batch.max_context_len))
        return meta
    decode = [b for b in range(num_seqs) if qlens[b] == 1]
    if decode:
        meta.groups.append(group(decode, 1, max(ctx[b] for b in decode)))
    for b in range(num_seqs):
        if qlens[b] > 1:
            meta.groups.append(group([b], qlens[b], ctx[b]))
    return meta


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store new rows k/v [T, Hkv, D] at cache slots [T] (block * block_size + offset)."""
    n_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, n_kv, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, n_kv, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attend q [T, Hq, D] over each row's cached context; returns [T, Hq * D] in q's dtype."""
    num_tokens, n_heads, head_dim = q.shape
    if len(meta.groups) == 1 and meta.groups[0].rows is None:
        return _attend_group(q, k_cache, v_cache, meta.groups[0], scale).reshape(num_tokens, -1)
    out = torch.empty_like(q)
    for g in meta.groups:
        out[g.rows] = _attend_group(q[g.rows], k_cache, v_cache, g, scale)
    return out.reshape(num_tokens, n_heads * head_dim)


def _attend_group(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttentionGroup, scale: float
) -> torch.Tensor:
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv = k_cache.shape[2]
    b, max_q = g.num_seqs, g.max_query_len
    qp = q.new_zeros(b, max_q, n_heads, head_dim)
    qp[g.row_seq, g.row_in_seq] = q
    # [b, n_blocks, block_size, Hkv, D] -> [b, Hkv, L, D]
    keys = k_cache[g.block_ids].reshape(b, -1, n_kv, head_dim).transpose(1, 2).to(q.dtype)
    values = v_cache[g.block_ids].reshape(b, -1, n_kv, head_dim).transpose(1, 2).to(q.dtype)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys, values, attn_mask=g.mask, scale=scale, enable_gqa=n_heads != n_kv
    )  # [b, Hq, max_q, D]
    return out.transpose(1, 2)[g.row_seq, g.row_in_seq]
