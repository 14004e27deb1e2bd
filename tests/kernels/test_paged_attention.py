"""Paged attention on the CPU: the torch path against a float64 per-sequence loop, the Triton kernels
under the interpreter (float32 / float16, tiny shapes) against the same reference, and argument errors."""

from __future__ import annotations

import os

import pytest
import torch

from lorafleet.kernels import attention_launch
from lorafleet.kernels.paged_attention import paged_decode_attention, paged_prefill_attention

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter tests run on CPU-only machines"
)


class Paged:
    """A random paged cache and per-sequence block tables over shuffled, non-contiguous pages, with
    -1 past each sequence's pages (never to be read)."""

    def __init__(self, seq_lens, *, hq=4, hkv=2, d=16, bs=4, dtype=torch.float32, extra_blocks=3, seed=0):
        gen = torch.Generator().manual_seed(seed)
        need = [-(-n // bs) for n in seq_lens]
        max_blocks = max([*need, 1]) + extra_blocks
        num_blocks = sum(need) + 5
        self.k = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
        self.v = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
        self.bt = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
        pages = torch.randperm(num_blocks, generator=gen)
        used = 0
        for b, n in enumerate(need):
            self.bt[b, :n] = pages[used : used + n].to(torch.int32)
            used += n
        self.lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.hq, self.d, self.dtype, self.gen = hq, d, dtype, gen

    def queries(self, rows):
        return torch.randn(rows, self.hq, self.d, generator=self.gen).to(self.dtype)


def reference(paged, q, query_lens, scale, window=None):
    """float64, one sequence, row and head at a time; keys read position by position via the table."""
    k, v, bt, bs = paged.k.double(), paged.v.double(), paged.bt, paged.k.shape[1]
    group = q.shape[1] // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    row = 0
    for b, qlen in enumerate(query_lens):
        n = int(paged.lens[b])
        keys = [k[int(bt[b, p // bs]), p % bs] for p in range(n)]
        vals = [v[int(bt[b, p // bs]), p % bs] for p in range(n)]
        for i in range(qlen):
            pos = n - qlen + i
            seen = [p for p in range(n) if p <= pos and (window is None or p > pos - window)]
            for h in range(q.shape[1]):
                if not seen:
                    continue
                kh = h // group
                s = torch.stack([q[row + i, h].double() @ keys[p][kh] for p in seen]) * scale
                w = torch.softmax(s, 0)
                out[row + i, h] = sum(w[j] * vals[p][kh] for j, p in enumerate(seen))
        row += qlen
    return out


def starts_of(query_lens):
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32)


def poisoned(q):
    return torch.full_like(q, float("nan"))


def assert_close(out, ref, dtype):
    assert not torch.isnan(out).any(), "an output element was not written"
    atol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)


# (seq_lens, hq, hkv): a zero-length padded row, a single token, page-boundary and unaligned lengths.
DECODE_CASES = [([13, 0, 30, 1, 8], 4, 2), ([5, 17, 0, 40], 4, 4), ([9, 33, 2], 8, 1)]


@pytest.mark.parametrize("seq_lens,hq,hkv", DECODE_CASES)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_decode(seq_lens, hq, hkv, window, dtype):
    paged = Paged(seq_lens, hq=hq, hkv=hkv, dtype=dtype)
    q = paged.queries(len(seq_lens))
    out = poisoned(q)
    paged_decode_attention(out, q, paged.k, paged.v, paged.bt, paged.lens, scale=0.3, sliding_window=window)
    ref = reference(paged, q, [1] * len(seq_lens), 0.3, window)
    assert_close(out, ref, dtype)
    assert (out[paged.lens == 0] == 0).all()


# (seq_lens, query_lens): chunked prefill on top of a cached context, a whole prompt, decode rows
# (1 query) mixed in, and a padded sequence with nothing.
PREFILL_CASES = [([20, 7, 31, 0], [6, 7, 1, 0]), ([12, 3, 40], [1, 1, 9])]


@pytest.mark.parametrize("seq_lens,query_lens", PREFILL_CASES)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_torch_prefill(seq_lens, query_lens, hq, hkv, window):
    paged = Paged(seq_lens, hq=hq, hkv=hkv, bs=8)
    q = paged.queries(sum(query_lens))
    out = poisoned(q)
    paged_prefill_attention(
        out,
        q,
        paged.k,
        paged.v,
        paged.bt,
        paged.lens,
        starts_of(query_lens),
        max_query_len=max(query_lens),
        scale=0.25,
        sliding_window=window,
    )
    assert_close(out, reference(paged, q, query_lens, 0.25, window), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("seq_lens,hq,hkv", DECODE_CASES)
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.float16, 32)])
def test_triton_decode(seq_lens, hq, hkv, num_splits, dtype, d):
    paged = Paged(seq_lens, hq=hq, hkv=hkv, d=d, dtype=dtype, seed=1)
    q = paged.queries(len(seq_lens))
    out = poisoned(q)
    paged_decode_attention(
        out, q, paged.k, paged.v, paged.bt, paged.lens, scale=0.3, num_splits=num_splits, backend="triton"
    )
    assert_close(out, reference(paged, q, [1] * len(seq_lens), 0.3), dtype)
    assert (out[paged.lens == 0] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("bs,d", [(1, 16), (128, 24), (16, 48)])
def test_triton_decode_window_block_sizes(num_splits, bs, d):
    """Sliding window; pages of 1 token, pages larger than a tile, and a head_dim that is not a power
    of two (masked lanes of BLOCK_D)."""
    seq_lens = [70, 0, 9, 33]
    paged = Paged(seq_lens, hq=4, hkv=2, d=d, bs=bs, seed=2)
    q = paged.queries(len(seq_lens))
    out = poisoned(q)
    paged_decode_attention(
        out,
        q,
        paged.k,
        paged.v,
        paged.bt,
        paged.lens,
        scale=0.2,
        sliding_window=20,
        num_splits=num_splits,
        backend="triton",
    )
    assert_close(out, reference(paged, q, [1] * len(seq_lens), 0.2, 20), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 2])
def test_triton_decode_multiply_sum_path(monkeypatch, num_splits):
    """The CUDA-core path (one query row per program, no tl.dot) that DOT_MIN_GROUP selects."""
    monkeypatch.setattr(attention_launch, "DOT_MIN_GROUP", 2)
    seq_lens = [13, 0, 40]
    paged = Paged(seq_lens, hq=4, hkv=4, d=32, seed=7)
    q = paged.queries(len(seq_lens))
    out = poisoned(q)
    paged_decode_attention(
        out,
        q,
        paged.k,
        paged.v,
        paged.bt,
        paged.lens,
        scale=0.3,
        sliding_window=30,
        num_splits=num_splits,
        backend="triton",
    )
    assert_close(out, reference(paged, q, [1] * len(seq_lens), 0.3, 30), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("seq_lens,query_lens", PREFILL_CASES)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2), (8, 1)])
@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.float16, 5)])
def test_triton_prefill(seq_lens, query_lens, hq, hkv, dtype, window):
    paged = Paged(seq_lens, hq=hq, hkv=hkv, bs=8, dtype=dtype, seed=3)
    q = paged.queries(sum(query_lens))
    out = poisoned(q)
    paged_prefill_attention(
        out,
        q,
        paged.k,
        paged.v,
        paged.bt,
        paged.lens,
        starts_of(query_lens),
        max_query_len=max(query_lens),
        scale=0.25,
        sliding_window=window,
        backend="triton",
    )
    assert_close(out, reference(paged, q, query_lens, 0.25, window), dtype)


@needs_interpreter
def test_triton_prefill_long_chunk_many_query_blocks():
    """A chunk longer than one query block (several programs per sequence) behind a decode row."""
    seq_lens, query_lens = [3, 90], [1, 70]
    paged = Paged(seq_lens, hq=2, hkv=1, bs=16, seed=4)
    q = paged.queries(sum(query_lens))
    out = poisoned(q)
    paged_prefill_attention(
        out,
        q,
        paged.k,
        paged.v,
        paged.bt,
        paged.lens,
        starts_of(query_lens),
        max_query_len=70,
        scale=0.25,
        backend="triton",
    )
    assert_close(out, reference(paged, q, query_lens, 0.25), torch.float32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_prefill_leaves_rows_outside_query_start_loc(backend):
    seq_lens, query_lens = [6, 10], [3, 3]
    paged = Paged(seq_lens, hq=2, hkv=2, seed=5)
    q = paged.queries(10)
    out = poisoned(q)
    starts = torch.tensor([2, 5, 8], dtype=torch.int32)
    paged_prefill_attention(
        out, q, paged.k, paged.v, paged.bt, paged.lens, starts, max_query_len=3, scale=0.5, backend=backend
    )
    assert torch.isnan(out[[0, 1, 8, 9]]).all()
    assert_close(out[2:8], reference(paged, q[2:8], query_lens, 0.5), torch.float32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_strided_q_from_fused_qkv(backend):
    """q and out as views with arbitrary row / head strides (q sliced out of a fused qkv output)."""
    seq_lens, hq, hkv, d = [11, 25, 0], 4, 2, 16
    paged = Paged(seq_lens, hq=hq, hkv=hkv, d=d, seed=6)
    qkv = torch.randn(3, (hq + 2 * hkv) * d)
    q = qkv[:, : hq * d].view(3, hq, d)
    wide = torch.full((3, hq, 2 * d), float("nan"))
    out = wide[:, :, :d]
    paged_decode_attention(out, q, paged.k, paged.v, paged.bt, paged.lens, scale=0.25, backend=backend)
    assert_close(out, reference(paged, q, [1, 1, 1], 0.25), torch.float32)
    assert torch.isnan(wide[:, :, d:]).all()


def test_decode_num_splits_from_shapes():
    f = attention_launch.decode_num_splits
    # Llama-3-8B, batch 1, 8k context table: 8 programs, split until the grid covers 132 SMs.
    assert f(1, 8, 512, 16, 64, 132) == attention_launch.MAX_SPLITS
    # A large batch already fills the GPU.
    assert f(256, 32, 512, 16, 64, 132) == 1
    # A short block table caps the split so each split keeps MIN_TILES_PER_SPLIT tiles.
    assert f(1, 8, 8, 16, 64, 132) == 1
    assert f(1, 8, 32, 16, 64, 132) == 4
    assert attention_launch.block_n_for(128, 2, 8192) == 32
    assert attention_launch.block_n_for(256, 2, 16384) == 32
    assert attention_launch.block_n_for(256, 4, 8192) == 16  # never below tl.dot's 16
    assert attention_launch.block_n_for(16, 4, 16384) == attention_launch.MAX_BLOCK_N


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_empty_batches_are_no_ops(backend):
    paged = Paged([4], hq=2, hkv=2)
    q = torch.empty(0, 2, 16)
    paged_decode_attention(
        torch.empty(0, 2, 16), q, paged.k, paged.v, paged.bt[:0], paged.lens[:0], scale=1.0, backend=backend
    )
    paged_prefill_attention(
        torch.empty(0, 2, 16),
        q,
        paged.k,
        paged.v,
        paged.bt,
        paged.lens,
        torch.zeros(2, dtype=torch.int32),
        max_query_len=0,
        scale=1.0,
        backend=backend,
    )


# --- argument errors: each names the argument ---------------------------------------------------------


def decode_args():
    paged = Paged([5, 9], hq=4, hkv=2)
    q = paged.queries(2)
    return dict(
        out=torch.empty_like(q),
        q=q,
        k_cache=paged.k,
        v_cache=paged.v,
        block_tables=paged.bt,
        seq_lens=paged.lens,
    )


def call_decode(**override):
    args = decode_args()
    kw = {k: override.pop(k) for k in ("scale", "sliding_window", "num_splits", "backend") if k in override}
    kw.setdefault("scale", 0.5)
    args.update(override)
    paged_decode_attention(*args.values(), **kw)


def test_good_decode_arguments_pass():
    call_decode()


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(q=torch.randn(2, 4, 16, dtype=torch.float64)), "q: dtype"),
        (dict(q=torch.randn(2, 4)), "q: expected 3-D"),
        (dict(q=torch.randn(2, 4, 32)[:, :, ::2]), "q: the last dimension"),
        (dict(q=torch.randn(2, 4, 8), out=torch.empty(2, 4, 8)), "q: head_dim 8"),
        (dict(out=torch.empty(2, 4, 16, dtype=torch.float16)), "out: dtype"),
        (dict(out=torch.empty(3, 4, 16)), "out: shape"),
        (dict(out=torch.empty(2, 4, 32)[:, :, ::2]), "out: the last dimension"),
        (dict(out="x"), "out: expected a torch.Tensor"),
        (dict(k_cache=torch.randn(8, 4, 2, 16, dtype=torch.float16)), "k_cache: dtype"),
        (dict(k_cache=torch.randn(8, 4, 2, 32)[..., ::2]), "k_cache: must be contiguous"),
        (dict(k_cache=torch.randn(8, 4, 3, 16), v_cache=torch.randn(8, 4, 3, 16)), "k_cache: Hkv=3"),
        (dict(k_cache=torch.randn(8, 3, 2, 16), v_cache=torch.randn(8, 3, 2, 16)), "k_cache: block_size 3"),
        (dict(k_cache=torch.randn(8, 4, 2, 32), v_cache=torch.randn(8, 4, 2, 32)), "k_cache: head_dim 32"),
        (dict(v_cache=torch.randn(9, 4, 2, 16)), "v_cache: shape"),
        (dict(v_cache=torch.randn(8, 4, 2)), "v_cache: expected 4-D"),
        (dict(block_tables=torch.zeros(2, 5, dtype=torch.int64)), "block_tables: dtype"),
        (dict(block_tables=torch.zeros(3, 5, dtype=torch.int32)), "block_tables: expected shape"),
        (dict(block_tables=torch.zeros(2, 10, dtype=torch.int32)[:, ::2]), "block_tables: the last dim"),
        (dict(seq_lens=torch.tensor([5, 9])), "seq_lens: dtype"),
        (dict(seq_lens=torch.tensor([5], dtype=torch.int32)), "seq_lens: expected shape"),
        (dict(seq_lens=torch.tensor([5, 99], dtype=torch.int32)), "seq_lens: seq_lens\\[1\\]=99"),
        (dict(seq_lens=torch.tensor([-1, 9], dtype=torch.int32)), "seq_lens: seq_lens\\[0\\]=-1"),
        (dict(block_tables=torch.full((2, 5), -1, dtype=torch.int32)), "block_tables: row 0"),
        (dict(scale=float("nan")), "scale: expected a finite float"),
        (dict(scale=None), "scale: expected a finite float"),
        (dict(sliding_window=0), "sliding_window: expected None or an int >= 1"),
        (dict(num_splits=0), "num_splits: expected None or an int >= 1"),
        (dict(backend="cuda"), "backend: 'cuda' is not one of"),
    ],
)
def test_decode_argument_errors(override, match):
    with pytest.raises(ValueError, match=match):
        call_decode(**override)


def call_prefill(**override):
    paged = Paged([5, 9], hq=4, hkv=2)
    q = paged.queries(4)
    args = dict(
        out=torch.empty_like(q),
        q=q,
        k_cache=paged.k,
        v_cache=paged.v,
        block_tables=paged.bt,
        seq_lens=paged.lens,
        query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32),
    )
    kw = dict(max_query_len=3, scale=0.5)
    kw.update({k: override.pop(k) for k in ("max_query_len", "scale", "backend") if k in override})
    args.update(override)
    paged_prefill_attention(*args.values(), **kw)


def test_good_prefill_arguments_pass():
    call_prefill()


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(query_start_loc=torch.tensor([0, 3, 4])), "query_start_loc: dtype"),
        (dict(query_start_loc=torch.tensor([0, 4], dtype=torch.int32)), "query_start_loc: expected shape"),
        (
            dict(query_start_loc=torch.tensor([0, 3, 2], dtype=torch.int32)),
            "query_start_loc: must be non-dec",
        ),
        (
            dict(query_start_loc=torch.tensor([0, 3, 5], dtype=torch.int32)),
            "query_start_loc: must be non-dec",
        ),
        (dict(max_query_len=2), "max_query_len: 2 is less than"),
        (dict(max_query_len=-1), "max_query_len: expected an int >= 0"),
        (dict(max_query_len=3.0), "max_query_len: expected an int >= 0"),
        (dict(seq_lens=torch.tensor([2, 9], dtype=torch.int32)), "seq_lens: seq_lens\\[0\\]=2 is shorter"),
        (dict(block_tables=torch.zeros(3, 5, dtype=torch.int32)), "seq_lens: expected shape"),
    ],
)
def test_prefill_argument_errors(override, match):
    with pytest.raises(ValueError, match=match):
        call_prefill(**override)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the no-interpreter error")
def test_triton_on_cpu_without_interpreter_is_refused():
    with pytest.raises(ValueError, match="backend: triton on CPU"):
        call_decode(backend="triton")
