"""Public paged attention over a block-table KV cache: ``paged_decode_attention`` and
``paged_prefill_attention``.

Each checks its arguments before anything is launched (a bad argument raises ``ValueError`` naming
it) and dispatches to the Triton kernels (``attention_triton``, launched by ``attention_launch``;
they read the paged cache in place) or to the plain torch path (``attention_torch``). Metadata
*values* (lengths, page ids) are checked on CPU tensors only, and on CUDA only with
``LORAFLEET_DEBUG_CHECKS=1``: reading them is a host sync, and the CUDA calls must stay capturable
in a CUDA graph.
"""

from __future__ import annotations

import itertools
import math

import torch

from lorafleet.kernels import attention_torch
from lorafleet.kernels.dispatch import FLOAT_DTYPES, checks_values, fail, resolve_backend

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


def _check_tensor(t: object, name: str, dim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    assert isinstance(t, torch.Tensor)
    if t.dim() != dim:
        fail(name, f"expected {dim}-D {layout}, got shape {tuple(t.shape)}")
    return t


def _check_int32(t: object, name: str, shape: tuple[int, ...], layout: str, device: torch.device) -> None:
    t = _check_tensor(t, name, len(shape), layout)
    if t.dtype != torch.int32:
        fail(name, f"dtype {t.dtype}, expected torch.int32")
    if tuple(t.shape) != shape:
        fail(name, f"expected shape {list(shape)} {layout}, got {list(t.shape)}")
    if t.device != device:
        fail(name, f"on {t.device}, expected {device}")
    if t.numel() and t.stride(-1) != 1:
        fail(name, "the last dimension must be contiguous (stride 1)")


def _check_common(
    out: object,
    q: object,
    k_cache: object,
    v_cache: object,
    block_tables: object,
    seq_lens: object,
    num_seqs: int | None,
    scale: object,
    sliding_window: object,
) -> tuple[int, int, int]:
    """Checks shared by decode and prefill; returns (num_seqs, block_size, max_blocks)."""
    q = _check_tensor(q, "q", 3, "[rows, Hq, D]")
    if q.dtype not in FLOAT_DTYPES:
        fail("q", f"dtype {q.dtype} is not float16, bfloat16 or float32")
    device, dtype = q.device, q.dtype
    rows, num_heads, head_dim = q.shape
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        fail("q", f"head_dim {head_dim} outside the supported [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if q.stride(2) != 1:
        fail("q", "the last dimension must be contiguous (stride 1)")
    out = _check_tensor(out, "out", 3, "[rows, Hq, D]")
    if out.dtype != dtype:
        fail("out", f"dtype {out.dtype} differs from q's {dtype}")
    if out.device != device:
        fail("out", f"on {out.device}, expected {device}")
    if out.shape != q.shape:
        fail("out", f"shape {tuple(out.shape)} differs from q's {tuple(q.shape)}")
    if out.stride(2) != 1:
        fail("out", "the last dimension must be contiguous (stride 1)")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        cache = _check_tensor(cache, name, 4, "[num_blocks, block_size, Hkv, D]")
        if cache.dtype != dtype:
            fail(name, f"dtype {cache.dtype} differs from q's {dtype}")
        if cache.device != device:
            fail(name, f"on {cache.device}, expected {device}")
        if not cache.is_contiguous():
            fail(name, "must be contiguous")
    assert isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)
    if v_cache.shape != k_cache.shape:
        fail("v_cache", f"shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        fail("k_cache", f"head_dim {cache_dim} differs from q's {head_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        fail("k_cache", f"Hkv={num_kv_heads} must divide Hq={num_heads}")
    if block_size < 1 or block_size & (block_size - 1):
        fail("k_cache", f"block_size {block_size} is not a power of two")
    bt = _check_tensor(block_tables, "block_tables", 2, "[B, max_blocks]")
    b = bt.shape[0] if num_seqs is None else num_seqs
    _check_int32(bt, "block_tables", (b, bt.shape[1]), "[B, max_blocks]", device)
    _check_int32(seq_lens, "seq_lens", (b,), "[B]", device)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        fail("scale", f"expected a finite float, got {scale!r}")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
    ):
        fail("sliding_window", f"expected None or an int >= 1, got {sliding_window!r}")
    del rows, num_blocks
    return b, block_size, bt.shape[1]


def _check_values(
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: list[int] | None,
) -> None:
    """Metadata values (a host sync on CUDA): lengths fit the block table, used pages exist, and
    every sequence's query rows fit in its context."""
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    lens = seq_lens.tolist()
    for b, n in enumerate(lens):
        if not 0 <= n <= max_blocks * block_size:
            fail(
                "seq_lens",
                f"seq_lens[{b}]={n} outside [0, max_blocks * block_size = {max_blocks * block_size}]",
            )
        if query_lens is not None and query_lens[b] > n:
            fail("seq_lens", f"seq_lens[{b}]={n} is shorter than its {query_lens[b]} query rows")
        used = block_tables[b, : -(-n // block_size)]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
            fail("block_tables", f"row {b} uses a page outside [0, {num_blocks})")


def paged_decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    backend: str = "auto",
) -> None:
    """One query token per sequence, attending over its paged context, written into ``out``.

    For sequence b with L = seq_lens[b] (the context including the current token, whose query sits at
    position L - 1), query head h and its kv head kh = h // (Hq / Hkv), keys at positions p with
    ``lo <= p < L``, where lo = 0, or ``max(0, L - sliding_window)`` with a window:

        s_p = scale * q[b, h] . K_p[kh]           (K_p = k_cache[block_tables[b, p // bs], p % bs])
        out[b, h] = sum_p softmax(s)_p * V_p[kh]  (softmax in float32, output in q's dtype)

    A row with seq_lens[b] == 0 (a padded CUDA-graph row) reads nothing and gets zeros.

    out:          [B, Hq, D] written; last dim contiguous, other strides arbitrary
    q:            [B, Hq, D] float16 / bfloat16 / float32, last dim contiguous, other strides
                  arbitrary (a view of a fused qkv output works as is)
    k_cache:      [num_blocks, block_size, Hkv, D] contiguous, q's dtype; block_size a power of two
    v_cache:      same shape as k_cache
    block_tables: [B, max_blocks] int32; entries past a sequence's ceil(L / block_size) pages are
                  never read (may be -1)
    seq_lens:     [B] int32
    num_splits:   split-K factor of the Triton kernel (None: chosen from shapes; never from values)
    backend:      "auto" (Triton on CUDA, torch elsewhere), "triton" (on CPU needs
                  TRITON_INTERPRET=1) or "torch"
    D (head_dim) in [16, 256]; Hq % Hkv == 0.
    """
    _check_common(
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        q.shape[0] if isinstance(q, torch.Tensor) else 0,
        scale,
        sliding_window,
    )
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
    ):
        fail("num_splits", f"expected None or an int >= 1, got {num_splits!r}")
    resolved = resolve_backend(backend, q.device)
    if checks_values(q.device):
        _check_values(k_cache, block_tables, seq_lens, None)
    if q.shape[0] == 0:
        return
    if resolved == "torch":
        attention_torch.decode_torch(
            out, q, k_cache, v_cache, block_tables, seq_lens, float(scale), sliding_window
        )
        return
    from lorafleet.kernels import attention_launch

    attention_launch.decode(
        out, q, k_cache, v_cache, block_tables, seq_lens, float(scale), sliding_window, num_splits
    )


def paged_prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> None:
    """Variable-length causal attention over the paged cache: prefill chunks (possibly on top of an
    already cached context) and single decode rows, mixed in one call.

    Sequence b owns query rows ``query_start_loc[b]:query_start_loc[b+1]`` (qlen_b of them); their
    K/V are already in the cache. Row i of b sits at position ``pos = seq_lens[b] - qlen_b + i`` and
    attends keys at positions p with ``p <= pos`` and, with a window, ``p > pos - sliding_window``:

        out[row, h] = sum_p softmax_p(scale * q[row, h] . K_p[h // G]) * V_p[h // G],  G = Hq / Hkv

    (float32 softmax, output in q's dtype; a row that sees no key gets zeros). Rows outside
    ``[query_start_loc[0], query_start_loc[B])`` are not written.

    out / q:         [T, Hq, D], last dim contiguous, other strides arbitrary; same dtype
                     (float16 / bfloat16 / float32)
    k_cache/v_cache: [num_blocks, block_size, Hkv, D] contiguous; block_size a power of two
    block_tables:    [B, max_blocks] int32 (entries past a sequence's pages are never read)
    seq_lens:        [B] int32, context length after this step (cached tokens incl. these rows)
    query_start_loc: [B+1] int32, non-decreasing row offsets
    max_query_len:   host int >= max qlen_b, used only to size the grid
    D in [16, 256]; Hq % Hkv == 0.
    """
    num_seqs, _, _ = _check_common(
        out, q, k_cache, v_cache, block_tables, seq_lens, None, scale, sliding_window
    )
    _check_int32(query_start_loc, "query_start_loc", (num_seqs + 1,), "[B+1]", q.device)
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 0:
        fail("max_query_len", f"expected an int >= 0, got {max_query_len!r}")
    resolved = resolve_backend(backend, q.device)
    if checks_values(q.device):
        starts = query_start_loc.tolist()
        qlens = [b - a for a, b in itertools.pairwise(starts)]
        if starts[0] < 0 or starts[-1] > q.shape[0] or any(n < 0 for n in qlens):
            fail("query_start_loc", f"must be non-decreasing within [0, T={q.shape[0]}], got {starts}")
        if qlens and max(qlens) > max_query_len:
            fail("max_query_len", f"{max_query_len} is less than the longest query ({max(qlens)} rows)")
        _check_values(k_cache, block_tables, seq_lens, qlens)
    if q.shape[0] == 0 or num_seqs == 0:
        return
    if resolved == "torch":
        attention_torch.prefill_torch(
            out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, float(scale), sliding_window
        )
        return
    from lorafleet.kernels import attention_launch

    attention_launch.prefill(
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        max_query_len,
        float(scale),
        sliding_window,
    )
