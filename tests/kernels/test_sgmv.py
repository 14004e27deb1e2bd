"""SGMV operators against a float64 loop reference, on the CPU (torch path and Triton interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

from lorafleet.kernels import add_lora, add_lora_slices, sgmv_expand, sgmv_shrink
from lorafleet.kernels.lora_ops import expand_slices, shrink_slices
from lorafleet.kernels.selfcheck import popularity_slots, reference_add_lora, segments_from_slots

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton interpreter runs only on CPU-only hosts")

BACKEND_DTYPES = [
    pytest.param("torch", torch.float32, 1e-6, id="torch-f32"),
    pytest.param("torch", torch.float16, 2e-3, id="torch-f16"),
    pytest.param("triton", torch.float32, 1e-5, id="triton-f32", marks=needs_interpreter),
    pytest.param("triton", torch.float16, 3e-3, id="triton-f16", marks=needs_interpreter),
]
POPULARITIES = ["distinct", "uniform", "skewed", "identical"]


@pytest.fixture(params=[16, 64, "rows"], ids=["narrow-tiles", "wide-tiles", "row-wise"])
def triton_path(request, monkeypatch):
    """Decode-shaped batches use 16-row tiles (and, at about one row per segment, the row-wise
    expand), prefill-shaped ones 64-row tiles; force each on every shape."""
    from lorafleet.kernels import sgmv_launch

    rows = request.param == "rows"
    monkeypatch.setattr(sgmv_launch, "ROWS_MAX_AVG_ROWS", float("inf") if rows else 0.0)
    monkeypatch.setattr(sgmv_launch, "ROWS_MAX_RANK", 256)
    monkeypatch.setattr(sgmv_launch, "ROWS_MIN_ROWS", 1)
    if not rows:
        monkeypatch.setattr(sgmv_launch, "_block_m", lambda T, num_segs: request.param)
    return request.param


def make_problem(
    gen: torch.Generator,
    dtype: torch.dtype,
    indptr: list[int],
    slots: list[int],
    *,
    h_in: int = 64,
    h_out: int = 48,
    n_slots: int = 12,
    r_max: int = 16,
    garbage: bool = True,
    ranks: list[int] | None = None,
):
    T = indptr[-1]
    x = torch.randn(T, h_in, generator=gen).to(dtype)
    y = torch.randn(T, h_out, generator=gen).to(dtype)
    a = (torch.randn(n_slots, r_max, h_in, generator=gen) / h_in**0.5).to(dtype)
    b = (torch.randn(n_slots, h_out, r_max, generator=gen) / r_max**0.5).to(dtype)
    if ranks is None:
        rank_t = torch.randint(1, r_max + 1, (n_slots,), generator=gen, dtype=torch.int32)
        rank_t[0] = r_max
    else:
        rank_t = torch.tensor(ranks, dtype=torch.int32)
    ranks = rank_t
    if garbage:
        # Entries past a slot's rank may hold anything; NaN proves they are never read.
        for k, r in enumerate(ranks.tolist()):
            a[k, r:] = float("nan")
            b[k, :, r:] = float("nan")
    scales = torch.rand(n_slots, generator=gen) + 0.5
    return (
        x,
        y,
        a,
        b,
        torch.tensor(indptr, dtype=torch.int32),
        torch.tensor(slots, dtype=torch.int32),
        ranks,
        scales,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_DTYPES)
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_add_lora_popularities(backend, dtype, tol, popularity, triton_path):
    gen = torch.Generator().manual_seed(hash(popularity) % 1000)
    n_slots = 40
    token_slots = popularity_slots(popularity, 36, n_slots, gen)
    indptr, slots = segments_from_slots(token_slots)
    x, y, a, b, seg_indptr, seg_slots, ranks, scales = make_problem(
        gen, dtype, indptr, slots, n_slots=n_slots
    )
    ref = reference_add_lora(y, x, a, b, seg_indptr, seg_slots, ranks, scales)
    add_lora(y, x, a, b, seg_indptr, seg_slots, ranks=ranks, scales=scales, backend=backend)
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_DTYPES)
def test_empty_segments_and_base_rows(backend, dtype, tol, triton_path):
    gen = torch.Generator().manual_seed(1)
    # Empty segments at the start, middle and end; two base-model (-1) segments.
    indptr = [0, 0, 5, 5, 9, 30, 31, 31, 40, 40]
    slots = [3, 1, 7, -1, 2, 5, 0, -1, 4]
    x, y, a, b, seg_indptr, seg_slots, ranks, scales = make_problem(gen, dtype, indptr, slots)
    y0 = y.clone()
    ref = reference_add_lora(y, x, a, b, seg_indptr, seg_slots, ranks, scales)
    add_lora(y, x, a, b, seg_indptr, seg_slots, ranks=ranks, scales=scales, backend=backend)
    assert rel_err(y, ref) < tol
    for lo, hi in ((5, 9), (31, 40)):
        assert torch.equal(y[lo:hi], y0[lo:hi]), "rows of slot -1 must stay bit-identical"


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_DTYPES)
def test_prefill_shaped_segments(backend, dtype, tol, triton_path):
    """Long segments; mixed ranks including the full r_max."""
    gen = torch.Generator().manual_seed(2)
    indptr = [0, 70, 71, 160, 230]
    slots = [2, 0, 5, 1]
    x, y, a, b, seg_indptr, seg_slots, ranks, scales = make_problem(
        gen, dtype, indptr, slots, h_in=64, h_out=80, r_max=32
    )
    ref = reference_add_lora(y, x, a, b, seg_indptr, seg_slots, ranks, scales)
    add_lora(y, x, a, b, seg_indptr, seg_slots, ranks=ranks, scales=scales, backend=backend)
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_DTYPES)
def test_split_k_and_rank_tiles(backend, dtype, tol):
    """A wide h_in splits the reduction; r_max > 64 needs several rank tiles."""
    gen = torch.Generator().manual_seed(3)
    indptr = [0, 1, 2, 3, 4]
    slots = [1, 3, 0, 2]
    x, y, a, b, seg_indptr, seg_slots, ranks, scales = make_problem(
        gen, dtype, indptr, slots, h_in=1024, h_out=32, n_slots=4, r_max=96, ranks=[96, 70, 8, 65]
    )
    ref = reference_add_lora(y, x, a, b, seg_indptr, seg_slots, ranks, scales)
    add_lora(y, x, a, b, seg_indptr, seg_slots, ranks=ranks, scales=scales, backend=backend)
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_DTYPES)
@pytest.mark.parametrize("r_max,ranks", [(12, [12, 5, 9, 1]), (20, [20, 17, 3, 8]), (8, [8, 7, 1, 4])])
def test_rank_runs_past_r_max(backend, dtype, tol, r_max, ranks, triton_path):
    """The kernels load whole 8-entry runs of rank positions; where r_max (or a rank) is not a
    multiple of 8 the run must stop at r_max and NaN garbage past the rank must not leak in."""
    gen = torch.Generator().manual_seed(r_max)
    indptr = [0, 1, 5, 6, 30]
    slots = [0, 1, 2, 3]
    x, y, a, b, seg_indptr, seg_slots, ranks_t, scales = make_problem(
        gen, dtype, indptr, slots, h_in=64, h_out=40, n_slots=4, r_max=r_max, ranks=ranks
    )
    ref = reference_add_lora(y, x, a, b, seg_indptr, seg_slots, ranks_t, scales)
    add_lora(y, x, a, b, seg_indptr, seg_slots, ranks=ranks_t, scales=scales, backend=backend)
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_DTYPES)
def test_fused_slices(backend, dtype, tol, triton_path):
    """One call writes q|k|v column slices, each with its own stacks, widths, ranks and scales."""
    gen = torch.Generator().manual_seed(4)
    indptr, slots = [0, 3, 4, 11, 20], [2, -1, 0, 5]
    widths = (64, 16, 16)
    x, _, _, _, seg_indptr, seg_slots, _, _ = make_problem(gen, dtype, indptr, slots, h_out=8)
    n_slots, r_max, h_in = 6, 16, x.shape[1]
    a_s = [(torch.randn(n_slots, r_max, h_in, generator=gen) / 8).to(dtype) for _ in widths]
    b_s = [(torch.randn(n_slots, w, r_max, generator=gen) / 4).to(dtype) for w in widths]
    ranks_s = [torch.randint(0, r_max + 1, (n_slots,), generator=gen, dtype=torch.int32) for _ in widths]
    scales_s = [torch.rand(n_slots, generator=gen) for _ in widths]
    y = torch.randn(x.shape[0], sum(widths), generator=gen).to(dtype)
    ref = y.double().clone()
    col = 0
    for a, b, r, c, w in zip(a_s, b_s, ranks_s, scales_s, widths):
        ref[:, col : col + w] = reference_add_lora(y[:, col : col + w], x, a, b, seg_indptr, seg_slots, r, c)
        col += w
    add_lora_slices(y, x, a_s, b_s, seg_indptr, seg_slots, ranks=ranks_s, scales=scales_s, backend=backend)
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_DTYPES)
def test_shrink_then_expand_public(backend, dtype, tol):
    gen = torch.Generator().manual_seed(5)
    indptr, slots = [0, 4, 9, 12], [1, -1, 3]
    x, y, a, b, seg_indptr, seg_slots, ranks, scales = make_problem(gen, dtype, indptr, slots)
    inter = sgmv_shrink(x, a, seg_indptr, seg_slots, ranks=ranks, backend=backend)
    assert inter.shape == (1, x.shape[0], a.shape[1]) and inter.dtype == torch.float32
    # Shrink's contract: exact rank columns, zeros past the rank and on base-model rows.
    for s, k in enumerate(slots):
        lo, hi = indptr[s], indptr[s + 1]
        if k < 0:
            assert torch.all(inter[0, lo:hi] == 0)
            continue
        r = int(ranks[k])
        exp = x[lo:hi].double() @ a[k, :r].double().T
        assert torch.allclose(inter[0, lo:hi, :r].double(), exp, rtol=tol * 10, atol=tol * 10)
        assert torch.all(inter[0, lo:hi, r:] == 0)
    ref = reference_add_lora(y, x, a, b, seg_indptr, seg_slots, ranks, scales)
    sgmv_expand(y, inter, b, seg_indptr, seg_slots, ranks=ranks, scales=scales, backend=backend)
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("backend,dtype,tol", BACKEND_DTYPES)
def test_two_halves_equal_add_lora_slices(backend, dtype, tol, triton_path):
    """shrink_slices then expand_slices (the engine's shrink-beside-the-matmul mode), with other
    work between them, add what add_lora_slices adds."""
    gen = torch.Generator().manual_seed(8)
    indptr, slots = [0, 1, 2, 3, 7, 8], [4, -1, 0, 2, 5]
    widths = (32, 16)
    x, _, _, _, seg_indptr, seg_slots, _, _ = make_problem(gen, dtype, indptr, slots, h_out=8)
    n_slots, r_max, h_in = 6, 16, x.shape[1]
    a_s = [(torch.randn(n_slots, r_max, h_in, generator=gen) / 8).to(dtype) for _ in widths]
    b_s = [(torch.randn(n_slots, w, r_max, generator=gen) / 4).to(dtype) for w in widths]
    ranks_s = [torch.randint(1, r_max + 1, (n_slots,), generator=gen, dtype=torch.int32) for _ in widths]
    scales_s = [torch.rand(n_slots, generator=gen) + 0.5 for _ in widths]
    y = torch.randn(x.shape[0], sum(widths), generator=gen).to(dtype)
    want = y.clone()
    add_lora_slices(want, x, a_s, b_s, seg_indptr, seg_slots, ranks=ranks_s, scales=scales_s, backend=backend)
    shrunk = shrink_slices(
        x, a_s, b_s, seg_indptr, seg_slots, ranks=ranks_s, scales=scales_s, backend=backend
    )
    x.fill_(float("nan"))  # the expand must not read x again
    expand_slices(y, shrunk)
    assert rel_err(y, want.double()) < tol


def test_expand_slices_checks_y():
    gen = torch.Generator().manual_seed(9)
    x, y, a, b, seg_indptr, seg_slots, ranks, scales = make_problem(gen, torch.float32, [0, 2, 5], [1, 3])
    shrunk = shrink_slices(x, a, b, seg_indptr, seg_slots, ranks=ranks, scales=scales)
    with pytest.raises(ValueError, match="y: has 4 rows"):
        expand_slices(y[:4], shrunk)
    with pytest.raises(ValueError, match="lora_b: output widths"):
        expand_slices(y[:, :8], shrunk)
    with pytest.raises(ValueError, match="y: dtype"):
        expand_slices(y.half(), shrunk)
    with pytest.raises(ValueError, match="shrunk: expected the LoraShrunk"):
        expand_slices(y, torch.zeros(1, 5, 16))
    with pytest.raises(ValueError, match="lora_a: h_in"):
        shrink_slices(x[:, :8], a, b, seg_indptr, seg_slots)


def test_defaults_full_rank_unit_scale():
    gen = torch.Generator().manual_seed(6)
    indptr, slots = [0, 3, 7], [0, 2]
    x, y, a, b, seg_indptr, seg_slots, _, _ = make_problem(gen, torch.float32, indptr, slots, garbage=False)
    ones, full = torch.ones(a.shape[0]), torch.full((a.shape[0],), a.shape[1], dtype=torch.int32)
    ref = reference_add_lora(y, x, a, b, seg_indptr, seg_slots, full, ones)
    add_lora(y, x, a, b, seg_indptr, seg_slots)
    assert rel_err(y, ref) < 1e-6


def test_zero_tokens_is_a_no_op():
    a = torch.randn(2, 4, 8)
    b = torch.randn(2, 6, 4)
    y = torch.empty(0, 6)
    add_lora(y, torch.empty(0, 8), a, b, torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("num_segs", [1, 3])
def test_every_segment_empty_is_a_no_op(backend, num_segs):
    """T = 0 with segments present (every one empty): the split heuristics once divided by zero."""
    a = torch.randn(4, 8, 32)
    b = torch.randn(4, 24, 8)
    indptr = torch.zeros(num_segs + 1, dtype=torch.int32)
    slots = torch.arange(num_segs, dtype=torch.int32)
    y = torch.empty(0, 24)
    add_lora(y, torch.empty(0, 32), a, b, indptr, slots, backend=backend)
    add_lora_slices(torch.empty(0, 48), torch.empty(0, 32), [a, a], [b, b], indptr, slots, backend=backend)
    inter = sgmv_shrink(torch.empty(0, 32), a, indptr, slots, backend=backend)
    assert inter.shape == (1, 0, 8)
    sgmv_expand(y, inter, b, indptr, slots, backend=backend)
