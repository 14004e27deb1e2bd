"""LoRA with its expand deferred into the consumer (``kernels/lora_deferred.py``) on the CPU: ``apply``
equals ``add_lora_slices``; the Triton RoPE and SiLU kernels with a pending delta (interpreter) equal
``apply`` followed by the plain operator; argument errors."""

from __future__ import annotations

import os

import pytest
import torch

from lorafleet.kernels import add_lora_slices
from lorafleet.kernels.fused_ops import rope_and_cache, silu_and_mul
from lorafleet.kernels.lora_deferred import PendingLoraDelta, shrink_lora_slices

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton interpreter runs only on CPU-only hosts")
# tl.dot in bfloat16 is wrong under the interpreter: float32 and float16 here, bfloat16 on the GPU.
DTYPES = [pytest.param(torch.float32, 1e-5, id="f32"), pytest.param(torch.float16, 2e-3, id="f16")]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def problem(widths, h_in=48, n_slots=5, r_max=8, dtype=torch.float32, seed=0):
    """Seven rows in segments with an empty one, a slot -1 one and mixed ranks; B and A beyond each
    slot's rank hold NaN, which must never be read."""
    g = gen(seed)
    x = torch.randn(7, h_in, generator=g).to(dtype)
    lora_a, lora_b = [], []
    ranks = torch.tensor([8, 4, 8, 3, 6], dtype=torch.int32)[:n_slots]
    for w in widths:
        a = (torch.randn(n_slots, r_max, h_in, generator=g) * 0.2).to(dtype)
        b = (torch.randn(n_slots, w, r_max, generator=g) * 0.2).to(dtype)
        for k, r in enumerate(ranks.tolist()):
            a[k, r:] = float("nan")
            b[k, :, r:] = float("nan")
        lora_a.append(a)
        lora_b.append(b)
    indptr = torch.tensor([0, 1, 1, 3, 4, 7], dtype=torch.int32)
    slots = torch.tensor([2, 0, -1, 3, 1], dtype=torch.int32)
    scales = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25])
    return x, lora_a, lora_b, indptr, slots, ranks, scales


@pytest.mark.parametrize("widths", [(24,), (24, 16, 16)])
def test_apply_equals_add_lora_slices(widths):
    x, la, lb, indptr, slots, ranks, scales = problem(widths)
    y = torch.randn(7, sum(widths), generator=gen(1))
    want = y.clone()
    add_lora_slices(want, x, la, lb, indptr, slots, ranks=ranks, scales=scales)
    cols = [sum(widths[:i]) for i in range(len(widths))]
    pending = shrink_lora_slices(x, la, lb, indptr, slots, cols=cols, ranks=ranks, scales=scales)
    got = y.clone()
    pending.apply(got)
    assert torch.equal(got, want)
    assert torch.isfinite(got).all()


def test_apply_non_adjacent_slices():
    # q and v of a q|k|v output without k: two runs, k's columns untouched.
    x, la, lb, indptr, slots, ranks, scales = problem((16, 8))
    y = torch.randn(7, 32, generator=gen(2))
    pending = shrink_lora_slices(x, la, lb, indptr, slots, cols=(0, 24), ranks=ranks, scales=scales)
    got = y.clone()
    pending.apply(got)
    want = y.clone()
    add_lora_slices(want[:, :16], x, la[:1], lb[:1], indptr, slots, ranks=ranks, scales=scales)
    add_lora_slices(want[:, 24:], x, la[1:], lb[1:], indptr, slots, ranks=ranks, scales=scales)
    assert torch.equal(got, want)
    assert torch.equal(got[:, 16:24], y[:, 16:24])


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("r_max", [8, 32])
@pytest.mark.parametrize("both", [True, False], ids=["gate-up", "up-only"])
def test_silu_and_mul_with_pending_lora(dtype, tol, r_max, both):
    inter = 40
    widths = (inter, inter) if both else (inter,)
    x, la, lb, indptr, slots, ranks, scales = problem(widths, r_max=r_max, dtype=dtype)
    gate_up = torch.randn(7, 2 * inter, generator=gen(3)).to(dtype)
    cols = (0, inter) if both else (inter,)
    for backend in ("torch", "triton"):
        pending = shrink_lora_slices(
            x, la, lb, indptr, slots, cols=cols, ranks=ranks, scales=scales, backend=backend
        )
        ref_in = gate_up.clone()
        pending.apply(ref_in)
        want = silu_and_mul(ref_in, backend="torch")
        before = gate_up.clone()
        got = silu_and_mul(gate_up, lora=pending, backend="triton")
        assert torch.equal(gate_up, before)  # the input is not modified
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        assert (want - silu_and_mul(gate_up, backend="torch")).abs().max() > 0.05  # the delta matters


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("targets", [("q", "k", "v"), ("q", "v"), ("k",)], ids=["qkv", "q-v", "k-only"])
def test_rope_and_cache_with_pending_lora(dtype, tol, targets):
    hq, hkv, d = 4, 2, 8
    width = {"q": hq * d, "k": hkv * d, "v": hkv * d}
    start = {"q": 0, "k": hq * d, "v": (hq + hkv) * d}
    x, la, lb, indptr, slots, ranks, scales = problem([width[t] for t in targets], dtype=dtype)
    g = gen(4)
    qkv = torch.randn(7, (hq + 2 * hkv) * d, generator=g).to(dtype)
    cos, sin = torch.randn(7, d, generator=g).to(dtype), torch.randn(7, d, generator=g).to(dtype)
    slot_mapping = torch.tensor([0, 5, 9, -1, 12, 3, 14])
    cache = torch.full((4, 4, hkv, d), float("nan"), dtype=dtype)
    pending = shrink_lora_slices(
        x, la, lb, indptr, slots, cols=[start[t] for t in targets], ranks=ranks, scales=scales
    )
    ref_qkv, ref_k, ref_v = qkv.clone(), cache.clone(), cache.clone()
    pending.apply(ref_qkv)
    rope_and_cache(
        ref_qkv,
        cos,
        sin,
        ref_k,
        ref_v,
        slot_mapping,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        backend="torch",
    )
    got_qkv, got_k, got_v = qkv.clone(), cache.clone(), cache.clone()
    rope_and_cache(
        got_qkv,
        cos,
        sin,
        got_k,
        got_v,
        slot_mapping,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        lora=pending,
        backend="triton",
    )
    torch.testing.assert_close(got_qkv.float(), ref_qkv.float(), rtol=tol, atol=tol)
    written = slot_mapping[slot_mapping >= 0]
    for got, want in ((got_k, ref_k), (got_v, ref_v)):
        g_rows, w_rows = got.view(-1, hkv, d)[written], want.view(-1, hkv, d)[written]
        torch.testing.assert_close(g_rows.float(), w_rows.float(), rtol=tol, atol=tol)
        assert torch.isnan(got.view(-1, hkv, d)[1]).all()  # a slot no row writes stays untouched


@needs_interpreter
def test_slices_that_are_not_whole_parts_fall_back_to_the_separate_expand():
    # A slice over part of gate (and one across q|k) cannot be fused: applied first, same result.
    x, la, lb, indptr, slots, ranks, scales = problem((16,))
    gate_up = torch.randn(7, 48, generator=gen(5))
    pending = shrink_lora_slices(x, la, lb, indptr, slots, cols=(4,), ranks=ranks, scales=scales)
    ref_in = gate_up.clone()
    pending.apply(ref_in)
    got = silu_and_mul(gate_up, lora=pending, backend="triton")
    torch.testing.assert_close(got, silu_and_mul(ref_in, backend="torch"), rtol=1e-5, atol=1e-5)
    qkv = torch.randn(7, 64, generator=gen(6))
    cos, sin = torch.randn(7, 8, generator=gen(7)), torch.randn(7, 8, generator=gen(8))
    cache = torch.zeros(4, 4, 2, 8)
    pending = shrink_lora_slices(x, la, lb, indptr, slots, cols=(24,), ranks=ranks, scales=scales)
    ref_qkv, got_qkv = qkv.clone(), qkv.clone()
    pending.apply(ref_qkv)
    kw = dict(num_q_heads=4, num_kv_heads=2, head_dim=8)
    slot_mapping = torch.arange(7)
    rope_and_cache(ref_qkv, cos, sin, cache.clone(), cache.clone(), slot_mapping, backend="torch", **kw)
    rope_and_cache(
        got_qkv, cos, sin, cache.clone(), cache.clone(), slot_mapping, lora=pending, backend="triton", **kw
    )
    torch.testing.assert_close(got_qkv, ref_qkv, rtol=1e-5, atol=1e-5)


def test_errors():
    x, la, lb, indptr, slots, ranks, _ = problem((16, 8))
    with pytest.raises(ValueError, match="cols: 1 column offsets for 2 slices"):
        shrink_lora_slices(x, la, lb, indptr, slots, cols=(0,), ranks=ranks)
    with pytest.raises(ValueError, match="cols: slice 1 starts at 8, inside slice 0"):
        shrink_lora_slices(x, la, lb, indptr, slots, cols=(0, 8), ranks=ranks)
    with pytest.raises(ValueError, match="cols: expected integers >= 0"):
        shrink_lora_slices(x, la, lb, indptr, slots, cols=(-1, 20), ranks=ranks)
    with pytest.raises(ValueError, match="lora_b: 1 slices but lora_a has 2"):
        shrink_lora_slices(x, la, lb[:1], indptr, slots, cols=(0,), ranks=ranks)
    pending = shrink_lora_slices(x, la, lb, indptr, slots, cols=(0, 16), ranks=ranks)
    assert isinstance(pending, PendingLoraDelta) and pending.end_col == 24
    with pytest.raises(ValueError, match="has 20 columns, the pending LoRA delta reaches column 24"):
        pending.apply(torch.zeros(7, 20))
    with pytest.raises(ValueError, match="has 6 rows, the pending LoRA delta 7"):
        pending.apply(torch.zeros(6, 24))
    with pytest.raises(ValueError, match=r"dtype torch\.float16 differs"):
        pending.apply(torch.zeros(7, 24, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"lora \(on gate_up\): has 6 rows"):
        silu_and_mul(torch.zeros(6, 32), lora=pending)
    with pytest.raises(ValueError, match="lora: expected a PendingLoraDelta or None, got dict"):
        silu_and_mul(torch.zeros(7, 32), lora={})  # type: ignore[arg-type]
