"""Paged attention Triton kernels on a real GPU: bf16/fp16 at Llama shapes against torch SDPA over the
gathered context, split-K on and off, sliding window, chunked prefill, and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet.kernels.paged_attention import paged_decode_attention, paged_prefill_attention

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}
DEV = "cuda"


class Paged:
    """Random cache + block tables over shuffled pages (-1 past each sequence's pages)."""

    def __init__(self, seq_lens, hq, hkv, d, dtype, *, bs=16, extra_blocks=4, seed=0):
        gen = torch.Generator().manual_seed(seed)
        need = [-(-n // bs) for n in seq_lens]
        max_blocks = max([*need, 1]) + extra_blocks
        num_blocks = sum(need) + 64
        self.k = torch.randn(num_blocks, bs, hkv, d, device=DEV, dtype=dtype)
        self.v = torch.randn(num_blocks, bs, hkv, d, device=DEV, dtype=dtype)
        bt = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
        pages = torch.randperm(num_blocks, generator=gen)
        used = 0
        for b, n in enumerate(need):
            bt[b, :n] = pages[used : used + n].to(torch.int32)
            used += n
        self.bt = bt.to(DEV)
        self.lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
        self.hq, self.d, self.dtype = hq, d, dtype

    def queries(self, rows):
        return torch.randn(rows, self.hq, self.d, device=DEV, dtype=self.dtype)


def sdpa_reference(paged, q, query_lens, scale, window=None):
    """float32 SDPA per sequence over its context gathered through the block table."""
    bs = paged.k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=DEV)
    lens = paged.lens.tolist()
    row = 0
    for b, qlen in enumerate(query_lens):
        n = lens[b]
        if qlen == 0 or n == 0:
            row += qlen
            continue
        pages = paged.bt[b, : -(-n // bs)].long()
        k = paged.k[pages].reshape(-1, *paged.k.shape[2:])[:n].float().transpose(0, 1)  # [Hkv, n, D]
        v = paged.v[pages].reshape(-1, *paged.v.shape[2:])[:n].float().transpose(0, 1)
        pos = torch.arange(n - qlen, n, device=DEV)
        kpos = torch.arange(n, device=DEV)
        mask = kpos[None, :] <= pos[:, None]
        if window is not None:
            mask &= kpos[None, :] > pos[:, None] - window
        qs = q[row : row + qlen].float().transpose(0, 1)  # [Hq, qlen, D]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[row : row + qlen] = o.transpose(0, 1)
        row += qlen
    return out


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "NaN / Inf in the output (an element not written?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}
LONG_MIX = [1, 17, 256, 1000, 2049, 4096, 8191, 8192]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_decode_real_shapes(dtype, shape, num_splits):
    hq, hkv, d = SHAPES[shape]
    paged = Paged([*LONG_MIX, 0], hq, hkv, d, dtype)
    q = paged.queries(len(LONG_MIX) + 1)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(
        out, q, paged.k, paged.v, paged.bt, paged.lens, scale=d**-0.5, num_splits=num_splits
    )
    ref = sdpa_reference(paged, q, [1] * q.shape[0], d**-0.5)
    assert (out[-1] == 0).all()
    assert rel_err(out[:-1], ref[:-1]) < TOL[dtype]


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_decode_batches_default_split(batch):
    hq, hkv, d = SHAPES["llama3-8b"]
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 2048, (batch,), generator=gen).tolist()
    paged = Paged(lens, hq, hkv, d, torch.bfloat16, seed=batch)
    q = paged.queries(batch)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(out, q, paged.k, paged.v, paged.bt, paged.lens, scale=d**-0.5)
    assert rel_err(out, sdpa_reference(paged, q, [1] * batch, d**-0.5)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_sliding_window(num_splits, shape):
    hq, hkv, d = SHAPES[shape]
    paged = Paged([100, 4096, 5000, 1024, 1025], hq, hkv, d, torch.bfloat16, seed=1)
    q = paged.queries(5)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(
        out,
        q,
        paged.k,
        paged.v,
        paged.bt,
        paged.lens,
        scale=d**-0.5,
        sliding_window=1024,
        num_splits=num_splits,
    )
    assert rel_err(out, sdpa_reference(paged, q, [1] * 5, d**-0.5, 1024)) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "hq,hkv,d,bs,dtype",
    [
        (8, 2, 256, 16, torch.bfloat16),
        (12, 4, 96, 32, torch.float16),
        (4, 4, 64, 1, torch.float16),
        (16, 2, 128, 256, torch.bfloat16),
        (8, 1, 128, 16, torch.float32),
        (32, 4, 128, 16, torch.float32),
    ],
)
def test_other_head_dims_block_sizes_dtypes(hq, hkv, d, bs, dtype):
    lens, qlens = [700, 1, 33, 1500], [1, 1, 33, 200]
    paged = Paged(lens, hq, hkv, d, dtype, bs=bs, seed=2)
    q = paged.queries(len(lens))
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(out, q, paged.k, paged.v, paged.bt, paged.lens, scale=d**-0.5)
    assert rel_err(out, sdpa_reference(paged, q, [1] * len(lens), d**-0.5)) < TOL[dtype]
    q = paged.queries(sum(qlens))
    out = torch.full_like(q, float("nan"))
    starts = torch.tensor([0, 1, 2, 35, 235], dtype=torch.int32, device=DEV)
    paged_prefill_attention(
        out, q, paged.k, paged.v, paged.bt, paged.lens, starts, max_query_len=200, scale=d**-0.5
    )
    assert rel_err(out, sdpa_reference(paged, q, qlens, d**-0.5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("window", [None, 512])
def test_chunked_prefill_on_context_mixed_with_decode(dtype, shape, window):
    hq, hkv, d = SHAPES[shape]
    # (context after this step, rows this step): whole prompts, chunks on a cached context, decode rows.
    seqs = [(1, 1), (512, 512), (1300, 300), (4097, 1), (8192, 1024), (77, 1), (2000, 17)]
    lens, qlens = [s[0] for s in seqs], [s[1] for s in seqs]
    paged = Paged(lens, hq, hkv, d, dtype, seed=3)
    q = paged.queries(sum(qlens))
    starts = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        out,
        q,
        paged.k,
        paged.v,
        paged.bt,
        paged.lens,
        starts,
        max_query_len=max(qlens),
        scale=d**-0.5,
        sliding_window=window,
    )
    assert rel_err(out, sdpa_reference(paged, q, qlens, d**-0.5, window)) < TOL[dtype]


def test_decode_strided_q_view_of_fused_qkv():
    hq, hkv, d = SHAPES["llama3-8b"]
    paged = Paged([300, 5, 2000], hq, hkv, d, torch.bfloat16, seed=4)
    qkv = torch.randn(3, (hq + 2 * hkv) * d, device=DEV, dtype=torch.bfloat16)
    q = qkv[:, : hq * d].view(3, hq, d)
    out = torch.full((3, hq, d), float("nan"), device=DEV, dtype=torch.bfloat16)
    paged_decode_attention(out, q, paged.k, paged.v, paged.bt, paged.lens, scale=d**-0.5)
    assert rel_err(out, sdpa_reference(paged, q, [1, 1, 1], d**-0.5)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_cuda_graph_replay_with_new_metadata(shape, num_splits):
    """Capture once, then replay with new block tables and lengths (incl. padded rows): the replay
    gives exactly what an eager call on the same values gives, and matches SDPA."""
    hq, hkv, d = SHAPES[shape]
    batch, max_blocks, bs = 32, 256, 16
    num_blocks = batch * max_blocks
    k = torch.randn(num_blocks, bs, hkv, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, d, device=DEV, dtype=torch.bfloat16)
    bt = torch.zeros(batch, max_blocks, dtype=torch.int32, device=DEV)
    lens = torch.ones(batch, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)

    def call(o):
        paged_decode_attention(o, q, k, v, bt, lens, scale=d**-0.5, num_splits=num_splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(out)  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(out)
    gen = torch.Generator().manual_seed(5)
    for trial in range(3):
        new_lens = torch.randint(0, max_blocks * bs + 1, (batch,), generator=gen)
        new_lens[trial] = 0  # a padded row
        new_bt = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
        for b, n in enumerate(new_lens.tolist()):
            new_bt[b, -(-n // bs) :] = -1
        bt.copy_(new_bt.to(torch.int32))
        lens.copy_(new_lens.to(torch.int32))
        q.copy_(torch.randn(batch, hq, d, generator=gen).to(torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        eager = torch.full_like(q, float("nan"))
        call(eager)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert (out[trial] == 0).all()
        paged = Paged.__new__(Paged)
        paged.k, paged.v, paged.bt, paged.lens = k, v, bt, lens
        keep = lens != 0
        ref = sdpa_reference(paged, q, [1] * batch, d**-0.5)
        assert rel_err(out[keep], ref[keep]) < TOL[torch.bfloat16]
