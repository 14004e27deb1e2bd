"""Launch configuration and launchers for the Triton paged-attention kernels (``attention_triton``).

Everything is chosen from shapes only (batch, heads, head_dim, block size, block-table width, dtype,
SM count), never from ``seq_lens`` values: no host sync, and a captured CUDA graph replays the same
kernels with new lengths and block tables. The knobs are module constants so
``benchmarks/bench_attention.py --set NAME=INT`` can vary them.
"""

from __future__ import annotations

import functools

import torch
import triton

from lorafleet.kernels.attention_triton import _decode_kernel, _decode_merge_kernel, _prefill_kernel

LOG2E = 1.4426950408889634

# Decode is memory-bound: aim for a few resident programs per SM so enough loads are in flight.
PROGRAMS_PER_SM = 4
MAX_SPLITS = 32
# A split should get at least this many tiles of the longest possible context, or the merge and the
# per-program setup outweigh what the extra parallelism buys.
MIN_TILES_PER_SPLIT = 2
# Bytes of one K tile (BLOCK_N rows of D elements). Decode: 8 KB = 32 tokens of bf16 D=128 (two
# 16-token pages per iteration); K + V of two pipeline stages take 32 KB of shared memory, so several
# programs share an SM. Measured on an H200 (bf16, D=128, batch 64-256 x context 1k-4k): 8% faster
# than 16 KB tiles, and as fast as 16 KB tiles with three stages (which hold 96 KB per program).
# Prefill's tiles feed a 64-row tl.dot, which wants the wider tile.
DECODE_TILE_BYTES = 8192
PREFILL_TILE_BYTES = 16384
MAX_BLOCK_N = 64
DECODE_NUM_WARPS = 4
# Smallest GQA group whose decode products run on tensor cores (tl.dot, group padded to 16 rows);
# smaller groups use the multiply-sum. Measured on an H200 (bf16, D=128, MHA): the padded dot runs
# at the copy bandwidth, the multiply-sum 2.4x slower (its p @ V sums across warps through shared
# memory every tile), so MHA uses the dot too.
DOT_MIN_GROUP = 1
PREFILL_BLOCK_M = 64
PREFILL_NUM_WARPS = 4
NUM_STAGES = 2
_DEFAULT_SMS = 132  # used off-GPU (the interpreter), where the choice only has to be valid


def _num_sms(device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def block_n_for(head_dim: int, element_size: int, tile_bytes: int) -> int:
    """Tokens per KV tile: ``tile_bytes`` worth of K rows, a power of two in [16, MAX_BLOCK_N]
    (16 is tl.dot's minimum)."""
    row_bytes = triton.next_power_of_2(head_dim) * element_size
    return max(16, min(MAX_BLOCK_N, tile_bytes // row_bytes))


def decode_num_splits(
    batch: int, num_kv_heads: int, max_blocks: int, block_size: int, block_n: int, num_sms: int
) -> int:
    """Split-K factor of decode: double it (powers of two keep the compiled variants few) while the
    grid is short of PROGRAMS_PER_SM programs per SM and the longest context the block table can
    hold still gives every split MIN_TILES_PER_SPLIT tiles."""
    programs = batch * num_kv_heads
    max_tiles = triton.cdiv(max_blocks * block_size, block_n)
    splits = 1
    while (
        splits * 2 <= MAX_SPLITS
        and programs * splits < PROGRAMS_PER_SM * num_sms
        and max_tiles >= 2 * splits * MIN_TILES_PER_SPLIT
    ):
        splits *= 2
    return splits


def default_num_splits(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor) -> int:
    """The split-K factor ``decode`` uses when none is given (from shapes and the SM count only)."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    block_n = block_n_for(head_dim, k_cache.element_size(), DECODE_TILE_BYTES)
    return decode_num_splits(
        q.shape[0], num_kv_heads, block_tables.shape[1], block_size, block_n, _num_sms(q.device)
    )


def _group_pad(group: int, use_dot: bool) -> int:
    # tl.dot needs at least 16 rows; the multiply-sum path serves exactly one row.
    return max(16, triton.next_power_of_2(group)) if use_dot else 1


def _stage_kwargs(device) -> dict:
    return {"num_stages": NUM_STAGES} if device.type == "cuda" else {}


def decode(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None,
) -> None:
    """Launch decode attention (arguments already validated)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    block_n = block_n_for(head_dim, k_cache.element_size(), DECODE_TILE_BYTES)
    if num_splits is None:
        num_splits = default_num_splits(q, k_cache, block_tables)
    use_dot = group >= DOT_MIN_GROUP
    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:  # unused: the kernel writes out directly
        part_o = part_lse = out
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_o,
        part_lse,
        block_tables,
        seq_lens,
        scale * LOG2E,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        GROUP=group,
        G_PAD=_group_pad(group, use_dot),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        USE_WINDOW=sliding_window is not None,
        USE_DOT=use_dot,
        IEEE=q.dtype == torch.float32,
        num_warps=DECODE_NUM_WARPS,
        **_stage_kwargs(q.device),
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch, num_heads)](
            out,
            part_o,
            part_lse,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=1 if block_d <= 64 else 2,
        )


def _seq_block(num_seqs: int) -> int:
    # Powers of 4 bound the number of compiled variants while keeping the in-kernel compare short.
    block = 16
    while block < num_seqs:
        block *= 4
    return block


def prefill_block_q(group: int, max_query_len: int) -> int:
    """Query rows per program: PREFILL_BLOCK_M tile rows shared by the group's heads, fewer when no
    sequence has that many rows, but enough for the 16-row minimum of tl.dot."""
    g_pad = triton.next_power_of_2(group)
    block_q = max(1, PREFILL_BLOCK_M // g_pad)
    block_q = min(block_q, triton.next_power_of_2(max(max_query_len, 1)))
    return max(block_q, triton.cdiv(16, g_pad))


def prefill(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
) -> None:
    """Launch varlen prefill attention (arguments already validated)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return
    group = num_heads // num_kv_heads
    block_q = prefill_block_q(group, max_query_len)
    # Sequence b's last block is at most (qsl[b] + qlen_b) // BLOCK_Q + b: the numbering skips a block
    # per sequence, so num_seqs * cdiv(max_query_len, BLOCK_Q) is NOT a bound (unaligned starts).
    q_blocks = num_tokens // block_q + num_seqs
    block_n = block_n_for(head_dim, k_cache.element_size(), PREFILL_TILE_BYTES)
    _prefill_kernel[(q_blocks, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        num_seqs,
        scale * LOG2E,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        GROUP=group,
        G_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        SEQ_BLOCK=_seq_block(num_seqs),
        USE_WINDOW=sliding_window is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=PREFILL_NUM_WARPS,
        **_stage_kwargs(q.device),
    )
