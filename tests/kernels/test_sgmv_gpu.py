"""SGMV Triton kernels on a real GPU: bf16/f16 at model sizes, and CUDA-graph capture + replay."""

from __future__ import annotations

import pytest
import torch

from lorafleet.kernels import add_lora, add_lora_slices, sgmv_launch
from lorafleet.kernels.selfcheck import popularity_slots, reference_add_lora, segments_from_slots

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def problem(T, popularity, dtype, *, h_in=4096, h_out=4096, n_slots=64, r_max=16, seed=0, prefill=None):
    gen = torch.Generator().manual_seed(seed)
    if prefill is None:
        indptr, slots = segments_from_slots(popularity_slots(popularity, T, n_slots, gen))
    else:
        n_seg, rows = prefill
        indptr, slots = (
            [i * rows for i in range(n_seg + 1)],
            torch.randperm(n_slots, generator=gen)[:n_seg].tolist(),
        )
        T = n_seg * rows
    dev = "cuda"
    x = torch.randn(T, h_in, generator=gen).to(dev, dtype)
    y = torch.randn(T, h_out, generator=gen).to(dev, dtype)
    a = (torch.randn(n_slots, r_max, h_in, generator=gen) / h_in**0.5).to(dev, dtype)
    b = (torch.randn(n_slots, h_out, r_max, generator=gen) / r_max**0.5).to(dev, dtype)
    ranks = torch.randint(r_max // 2, r_max + 1, (n_slots,), generator=gen, dtype=torch.int32)
    for k, r in enumerate(ranks.tolist()):
        a[k, r:] = float("nan")
        b[k, :, r:] = float("nan")
    scales = (torch.rand(n_slots, generator=gen) + 0.5).to(dev)
    return (
        x,
        y,
        a,
        b,
        torch.tensor(indptr, dtype=torch.int32, device=dev),
        torch.tensor(slots, dtype=torch.int32, device=dev),
        ranks.to(dev),
        scales,
    )


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("popularity", ["distinct", "uniform", "skewed", "identical"])
@pytest.mark.parametrize("T,r_max", [(1, 16), (32, 16), (256, 16), (128, 64), (256, 128)])
def test_decode_shapes(dtype, popularity, T, r_max):
    x, y, a, b, indptr, slots, ranks, scales = problem(T, popularity, dtype, r_max=r_max, n_slots=300)
    ref = reference_add_lora(y, x, a, b, indptr, slots, ranks, scales)
    add_lora(y, x, a, b, indptr, slots, ranks=ranks, scales=scales)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r_max", [16, 64])
def test_prefill_shape(dtype, r_max):
    x, y, a, b, indptr, slots, ranks, scales = problem(0, "distinct", dtype, r_max=r_max, prefill=(8, 512))
    ref = reference_add_lora(y, x, a, b, indptr, slots, ranks, scales)
    add_lora(y, x, a, b, indptr, slots, ranks=ranks, scales=scales)
    assert rel_err(y, ref) < TOL[dtype]


def test_fused_qkv_gqa():
    dtype, T, n_slots, r = torch.bfloat16, 256, 128, 32
    gen = torch.Generator().manual_seed(3)
    indptr, slots = segments_from_slots(popularity_slots("uniform", T, n_slots, gen))
    dev = "cuda"
    widths = (4096, 1024, 1024)
    x = torch.randn(T, 4096, generator=gen).to(dev, dtype)
    y = torch.randn(T, sum(widths), generator=gen).to(dev, dtype)
    a_s = [(torch.randn(n_slots, r, 4096, generator=gen) / 64).to(dev, dtype) for _ in widths]
    b_s = [(torch.randn(n_slots, w, r, generator=gen) / 6).to(dev, dtype) for w in widths]
    ranks = [torch.randint(0, r + 1, (n_slots,), generator=gen, dtype=torch.int32).to(dev) for _ in widths]
    scales = [torch.rand(n_slots, generator=gen).to(dev) for _ in widths]
    ip = torch.tensor(indptr, dtype=torch.int32, device=dev)
    sl = torch.tensor(slots, dtype=torch.int32, device=dev)
    ref, col = y.double().clone(), 0
    for a, b, rk, c, w in zip(a_s, b_s, ranks, scales, widths):
        ref[:, col : col + w] = reference_add_lora(y[:, col : col + w], x, a, b, ip, sl, rk, c)
        col += w
    add_lora_slices(y, x, a_s, b_s, ip, sl, ranks=ranks, scales=scales)
    assert rel_err(y, ref) < TOL[dtype]


def force_path(monkeypatch, path):
    """16- or 64-row tiles, or the row-wise expand (after a 16-row tile shrink), whatever the shape."""
    rows = path == "rows"
    monkeypatch.setattr(sgmv_launch, "ROWS_MAX_AVG_ROWS", float("inf") if rows else 0.0)
    monkeypatch.setattr(sgmv_launch, "ROWS_MAX_RANK", 256)
    monkeypatch.setattr(sgmv_launch, "ROWS_MIN_ROWS", 1)
    if not rows:
        monkeypatch.setattr(sgmv_launch, "_block_m", lambda T, num_segs: path)


@pytest.mark.parametrize("path", [16, "rows"])
@pytest.mark.parametrize("popularity", ["distinct", "uniform", "identical"])
@pytest.mark.parametrize("T,r_max", [(1, 16), (64, 16), (64, 64), (200, 128)])
def test_tile_and_row_wise_paths(path, popularity, T, r_max, monkeypatch):
    force_path(monkeypatch, path)
    x, y, a, b, indptr, slots, ranks, scales = problem(
        T, popularity, torch.bfloat16, r_max=r_max, n_slots=300
    )
    ref = reference_add_lora(y, x, a, b, indptr, slots, ranks, scales)
    add_lora(y, x, a, b, indptr, slots, ranks=ranks, scales=scales)
    assert rel_err(y, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("block_m", [16, 64, "rows"])
def test_cuda_graph_capture_and_replay(block_m, monkeypatch):
    """Captured once; new x values and new metadata (same shapes) copied in place give new results."""
    force_path(monkeypatch, block_m)
    dtype = torch.bfloat16
    x, y, a, b, indptr, slots, ranks, scales = problem(64, "uniform", dtype, n_slots=128, seed=5)
    y_base = y.clone()
    for _ in range(2):  # compile outside the capture
        add_lora(y, x, a, b, indptr, slots, ranks=ranks, scales=scales)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        add_lora(y, x, a, b, indptr, slots, ranks=ranks, scales=scales)
    for seed, pop in ((11, "distinct"), (12, "skewed"), (13, "identical")):
        x2, _, _, _, indptr2, slots2, _, _ = problem(64, pop, dtype, n_slots=128, seed=seed)
        # Same number of segments is required for the same graph: pad with empty segments.
        n = slots.shape[0]
        pad = n - slots2.shape[0]
        if pad < 0:
            continue
        indptr2 = torch.cat([indptr2, indptr2[-1:].repeat(pad)])
        slots2 = torch.cat([slots2, torch.full((pad,), -1, dtype=torch.int32, device="cuda")])
        x.copy_(x2)
        indptr.copy_(indptr2)
        slots.copy_(slots2)
        y.copy_(y_base)
        ref = reference_add_lora(y, x, a, b, indptr, slots, ranks, scales)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "T,popularity,r_max",
    [(1, "distinct", 16), (64, "distinct", 16), (64, "distinct", 64), (256, "identical", 64)],
)
def test_programmatic_dependent_launch_matches_serial(T, popularity, r_max, monkeypatch):
    """Expand launched as a programmatic dependent of shrink (loading B and y before it waits)
    gives bit-identical results to two serial launches, also over many back-to-back calls that
    reuse the same partials memory, and inside a captured CUDA graph."""
    if not sgmv_launch.pdl_enabled(torch.empty(0, device="cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+ and Triton's gdc ops")
    x, y, a, b, indptr, slots, ranks, scales = problem(
        T, popularity, torch.bfloat16, r_max=r_max, n_slots=300
    )
    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(sgmv_launch, "USE_PDL", pdl)
        out = y.clone()
        for _ in range(20):
            add_lora(out, x, a, b, indptr, slots, ranks=ranks, scales=scales)
        graph_out = y.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(5):
                add_lora(graph_out, x, a, b, indptr, slots, ranks=ranks, scales=scales)
        for _ in range(4):
            graph.replay()
        torch.cuda.synchronize()
        outs[pdl] = (out, graph_out)
    assert torch.equal(outs[True][0], outs[False][0])
    assert torch.equal(outs[True][1], outs[False][1])
    assert torch.equal(outs[True][1], outs[True][0])


@pytest.mark.parametrize("path", ["default", "rows"])
@pytest.mark.parametrize("T", [40, 400])
def test_empty_segments_and_rows_without_adapter(T, path, monkeypatch):
    if path == "rows":
        force_path(monkeypatch, path)
    dtype, dev = torch.bfloat16, "cuda"
    x, y, a, b, _, _, ranks, scales = problem(T, "distinct", dtype, n_slots=64, seed=4)
    bounds = [0, 0, 7, 7, 19, 20, T, T]
    indptr = torch.tensor(bounds, dtype=torch.int32, device=dev)
    slots = torch.tensor([3, 5, 9, -1, 12, 7, 1], dtype=torch.int32, device=dev)
    untouched = y[7:19].clone()
    ref = reference_add_lora(y, x, a, b, indptr, slots, ranks, scales)
    add_lora(y, x, a, b, indptr, slots, ranks=ranks, scales=scales)
    assert torch.equal(y[7:19], untouched)
    assert rel_err(y, ref) < TOL[dtype]
