"""Plain torch paged attention: the CPU path of ``paged_*_attention`` and the oracle of the Triton kernels.

It walks the sequences on the host (reading ``seq_lens`` / ``query_start_loc`` back is a sync on
CUDA), gathers each context through its block table and attends with an explicit float32 softmax.
Meant for the CPU and for tests, not for a GPU hot path.
"""

from __future__ import annotations

import torch


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence, ``[seq_len, Hkv, D]``, read through its block
    table (only the ``ceil(seq_len / block_size)`` pages it uses)."""
    block_size = cache.shape[1]
    pages = block_table[: -(-seq_len // block_size)].long()
    return cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def attend_sequence(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention of queries ``q [n, Hq, D]`` at ``positions [n]`` over ``keys / values
    [L, Hkv, D]`` (key j at position j). Key j is visible to a query at position p when
    ``j <= p`` and, with a window w, ``j > p - w``. A query that sees no key gets zeros.
    Returns float32 ``[n, Hq, D]``."""
    num_heads, num_kv_heads = q.shape[1], keys.shape[1]
    group = num_heads // num_kv_heads
    # GQA: query head h reads kv head h // group.
    k = keys.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale  # [Hq, n, L]
    key_pos = torch.arange(keys.shape[0], device=q.device)
    visible = key_pos[None, :] <= positions[:, None]  # [n, L]
    if sliding_window is not None:
        visible &= key_pos[None, :] > positions[:, None] - sliding_window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: all NaN -> 0
    return torch.einsum("hnl,lhd->nhd", probs, v)


def prefill_torch(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> None:
    """Rows ``query_start_loc[b]:query_start_loc[b+1]`` of ``q`` are the last ``qlen_b`` positions of
    sequence b's ``seq_lens[b]`` cached tokens; writes their attention output into ``out``."""
    lens = seq_lens.tolist()
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        if end == start:
            continue
        qlen = end - start
        positions = torch.arange(seq_len - qlen, seq_len, device=q.device)
        keys = gather_context(k_cache, block_tables[b], max(seq_len, 0))
        values = gather_context(v_cache, block_tables[b], max(seq_len, 0))
        o = attend_sequence(q[start:end], keys, values, positions, scale, sliding_window)
        out[start:end] = o.to(out.dtype)


def decode_torch(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> None:
    """Decode is prefill with one query row per sequence (at position ``seq_lens[b] - 1``); a row
    with ``seq_lens[b] == 0`` sees no key and gets zeros."""
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    prefill_torch(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window)
