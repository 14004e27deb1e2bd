"""Fused elementwise operators on the CPU: the torch path against the worker's current code (bit for
bit) and float64, the Triton kernels under the interpreter, argument errors and empty batches."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

from lorafleet.kernels import fused_ops, fused_triton
from lorafleet.kernels.fused_ops import fused_add_rms_norm, rms_norm, rope_and_cache, silu_and_mul
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.rope import RotaryEmbedding

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton interpreter runs only on CPU-only hosts")
TRITON_DTYPES = [
    pytest.param(torch.float32, 2e-6, id="f32"),
    pytest.param(torch.float16, 2e-3, id="f16"),
]
EPS = 1e-5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rope_config(hq: int, hkv: int, d: int) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32,
        hidden_size=hq * d,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=hq,
        num_key_value_heads=hkv,
        head_dim=d,
        max_position_embeddings=64,
    )


def rope_problem(T, hq, hkv, d, dtype, *, block_size=4, num_blocks=6, seed=0, padded=()):
    g = gen(seed)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=g).to(dtype)
    rope = RotaryEmbedding(rope_config(hq, hkv, d))
    positions = torch.randint(0, 60, (T,), generator=g)
    cos, sin = rope.cos_sin(positions, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[list(padded)] = -1
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    return rope, qkv, cos, sin, k_cache, v_cache, slots


# --- torch path == the worker's code before this change, bit for bit ---
# Verbatim copies of worker/layers.py RMSNorm.forward and silu_and_mul, worker/rope.py
# RotaryEmbedding.forward and worker/attention.py write_kv as of commit c65e0b5: the model now
# calls the fused operators, so importing the worker would compare the operators with themselves.


def worker_rms_norm(weight: torch.Tensor, eps: float, x: torch.Tensor) -> torch.Tensor:
    in_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(in_dtype)


def worker_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :half]) * gate_up[:, half:]


def worker_rope(q, k, cos, sin):
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def write_kv(k_cache, v_cache, k, v, slots) -> None:
    n_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, n_kv, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, n_kv, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_paths_equal_worker_code(dtype: torch.dtype) -> None:
    g = gen(1)
    T, H = 5, 48
    weight = torch.randn(H, generator=g).to(dtype)
    norm = functools.partial(worker_rms_norm, weight, EPS)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    delta = torch.randn(T, H, generator=g).to(dtype)
    assert torch.equal(rms_norm(hidden, weight, EPS), norm(hidden))

    new_hidden = hidden + delta
    x, residual = delta.clone(), hidden.clone()
    fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(residual, new_hidden) and torch.equal(x, norm(new_hidden))

    gate_up = torch.randn(T, 2 * 24, generator=g).to(dtype)
    assert torch.equal(silu_and_mul(gate_up), worker_silu_and_mul(gate_up))
    out = torch.full((T, 24), float("nan"), dtype=dtype)
    assert silu_and_mul(gate_up, out) is out and torch.equal(out, worker_silu_and_mul(gate_up))

    hq, hkv, d = 4, 2, 8
    _, qkv, cos, sin, k_cache, v_cache, slots = rope_problem(T, hq, hkv, d, dtype)
    q, k, v = qkv.clone().split([hq * d, hkv * d, hkv * d], dim=-1)
    q_ref, k_ref = worker_rope(q.reshape(T, hq, d), k.reshape(T, hkv, d), cos, sin)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    write_kv(kc_ref, vc_ref, k_ref, v.reshape(T, hkv, d), slots)
    kv_before = qkv[:, hq * d :].clone()
    rope_and_cache(qkv, cos, sin, k_cache, v_cache, slots, num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    assert torch.equal(qkv[:, : hq * d], q_ref.reshape(T, -1))
    assert torch.equal(qkv[:, hq * d :], kv_before)  # k and v in qkv are left as they were
    assert torch.allclose(k_cache, kc_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(v_cache, vc_ref, rtol=0, atol=0, equal_nan=True)


# --- float64 references ---


def rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated in float64 with the pairs (i, i + D/2)."""
    xd, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    lo, hi = xd[..., :half], xd[..., half:]
    return torch.cat((lo * c[..., :half] - hi * s[..., :half], hi * c[..., half:] + lo * s[..., half:]), -1)


def test_torch_path_against_float64() -> None:
    g = gen(2)
    x = torch.randn(7, 64, generator=g)
    w = torch.randn(64, generator=g)
    torch.testing.assert_close(rms_norm(x, w, EPS).double(), rms_ref(x, w, EPS), rtol=1e-6, atol=1e-6)
    gate_up = torch.randn(7, 40, generator=g) * 4
    g64, u64 = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up).double(), g64 * torch.sigmoid(g64) * u64)
    T, hq, hkv, d = 6, 4, 2, 16
    _, qkv, cos, sin, kc, vc, slots = rope_problem(T, hq, hkv, d, torch.float32)
    q_in = qkv[:, : hq * d].reshape(T, hq, d).clone()
    k_in = qkv[:, hq * d : (hq + hkv) * d].reshape(T, hkv, d).clone()
    rope_and_cache(qkv, cos, sin, kc, vc, slots, num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    torch.testing.assert_close(qkv[:, : hq * d].reshape(T, hq, d).double(), rope_ref(q_in, cos, sin))
    torch.testing.assert_close(kc.view(-1, hkv, d)[slots].double(), rope_ref(k_in, cos, sin))


# --- Triton under the interpreter ---


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", TRITON_DTYPES)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-block", "chunked"])
def test_triton_norms(dtype, tol, chunked, monkeypatch) -> None:
    if chunked:  # force the two-pass loop: H = 40 in chunks of 16
        monkeypatch.setattr(fused_triton, "RMS_MAX_BLOCK", 16)
        monkeypatch.setattr(fused_triton, "RMS_CHUNK", 16)
    g = gen(3)
    T, H = 3, 40
    # A strided row view (columns of a wider buffer) as the model's column slices are.
    x = torch.randn(T, H + 8, generator=g).to(dtype)[:, 4 : 4 + H]
    w = torch.randn(H, generator=g).to(dtype)
    got = rms_norm(x, w, EPS, backend="triton")
    assert got.is_contiguous() and not got.isnan().any()
    torch.testing.assert_close(got, rms_norm(x, w, EPS, backend="torch"), rtol=tol, atol=tol)

    res = torch.randn(T, H, generator=g).to(dtype)
    xs = {b: (x.clone(), res.clone()) for b in ("triton", "torch")}
    for b, (xb, rb) in xs.items():
        fused_add_rms_norm(xb, rb, w, EPS, backend=b)
    assert torch.equal(xs["triton"][1], xs["torch"][1])  # the residual sum rounds identically
    torch.testing.assert_close(xs["triton"][0], xs["torch"][0], rtol=tol, atol=tol)


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", TRITON_DTYPES)
def test_triton_silu_and_mul_writes_every_element(dtype, tol, monkeypatch) -> None:
    monkeypatch.setattr(fused_triton, "SILU_BLOCK", 8)  # I = 20: three column programs, last partial
    g = gen(4)
    gate_up = (torch.randn(5, 40, generator=g) * 3).to(dtype)
    out = torch.full((5, 20), float("nan"), dtype=dtype)
    assert silu_and_mul(gate_up, out, backend="triton") is out
    assert not out.isnan().any()
    torch.testing.assert_close(out, silu_and_mul(gate_up, backend="torch"), rtol=tol, atol=tol)
    fresh = silu_and_mul(gate_up, backend="triton")
    assert torch.equal(fresh, out)


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", TRITON_DTYPES)
@pytest.mark.parametrize(
    "hq,hkv,d,tile",
    [(4, 2, 8, 1024), (4, 4, 16, 1024), (3, 1, 12, 16)],
    ids=["gqa-one-tile", "mha", "odd-heads-d12-many-tiles"],
)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_triton_rope_and_cache(dtype, tol, hq, hkv, d, tile, slot_dtype, monkeypatch) -> None:
    # tile=16 with D=12 (half 6 -> 8 lanes): two heads per program, so tiles straddle q|k|v borders.
    monkeypatch.setattr(fused_triton, "ROPE_TILE_ELEMS", tile)
    T = 5
    _, qkv, cos, sin, kc, vc, slots = rope_problem(T, hq, hkv, d, dtype, padded=(2,))
    slots = slots.to(slot_dtype)
    results = {}
    for backend in ("triton", "torch"):
        q2, kc2, vc2 = qkv.clone(), kc.clone(), vc.clone()
        rope_and_cache(
            q2, cos, sin, kc2, vc2, slots, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, backend=backend
        )
        results[backend] = (q2, kc2, vc2)
    (q_t, kc_t, vc_t), (q_r, kc_r, vc_r) = results["triton"], results["torch"]
    torch.testing.assert_close(q_t, q_r, rtol=tol, atol=tol)
    assert torch.equal(q_t[:, hq * d :], qkv[:, hq * d :])  # k|v columns untouched
    written = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    written[slots[slots >= 0].long()] = True
    for got, ref in ((kc_t, kc_r), (vc_t, vc_r)):
        flat, flat_ref = got.view(-1, hkv, d), ref.view(-1, hkv, d)
        assert not flat[written].isnan().any()  # every element of every real row written
        assert flat[~written].isnan().all()  # the padded row and unused slots untouched
        torch.testing.assert_close(flat[written], flat_ref[written], rtol=tol, atol=tol)
    assert torch.equal(vc_t.view(-1, hkv, d)[written], vc_r.view(-1, hkv, d)[written])  # v is a copy


@needs_interpreter
def test_triton_rope_float32_cos_with_half_activations() -> None:
    """cos/sin may be float32 for 16-bit activations; the cache may be float32 too."""
    hq, hkv, d, T = 2, 1, 8, 3
    rope, qkv, _, _, kc, vc, slots = rope_problem(T, hq, hkv, d, torch.float16)
    cos, sin = rope.cos_sin(torch.arange(T), torch.float32)
    kc32, vc32 = kc.float(), vc.float()
    results = []
    for backend in ("triton", "torch"):
        q2, k2, v2 = qkv.clone(), kc32.clone(), vc32.clone()
        rope_and_cache(
            q2, cos, sin, k2, v2, slots, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, backend=backend
        )
        results.append((q2, k2, v2))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, equal_nan=True)


# --- empty batches, dispatch, errors ---


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_empty_batch_is_a_no_op(backend: str) -> None:
    w = torch.ones(8)
    assert rms_norm(torch.empty(0, 8), w, EPS, backend=backend).shape == (0, 8)
    fused_add_rms_norm(torch.empty(0, 8), torch.empty(0, 8), w, EPS, backend=backend)
    assert silu_and_mul(torch.empty(0, 6), backend=backend).shape == (0, 3)
    kc = torch.full((2, 4, 1, 4), float("nan"))
    vc = kc.clone()
    empty = torch.empty(0, 4)
    slots = torch.empty(0, dtype=torch.int64)
    rope_and_cache(
        torch.empty(0, 12),
        empty,
        empty,
        kc,
        vc,
        slots,
        num_q_heads=1,
        num_kv_heads=1,
        head_dim=4,
        backend=backend,
    )
    assert kc.isnan().all() and vc.isnan().all()


def test_auto_is_torch_on_cpu(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("launched Triton for CPU tensors under backend='auto'")

    for name in ("launch_rms_norm", "launch_silu_and_mul", "launch_rope_and_cache"):
        monkeypatch.setattr(fused_triton, name, boom)
    x = torch.randn(2, 8)
    rms_norm(x, torch.ones(8), EPS)
    fused_add_rms_norm(x, x.clone(), torch.ones(8), EPS)
    silu_and_mul(torch.randn(2, 8))
    _, qkv, cos, sin, kc, vc, slots = rope_problem(2, 2, 1, 4, torch.float32)
    rope_and_cache(qkv, cos, sin, kc, vc, slots, num_q_heads=2, num_kv_heads=1, head_dim=4)


def _norm_call(**override):
    args = dict(x=torch.randn(3, 8), residual=torch.randn(3, 8), weight=torch.ones(8), eps=EPS)
    args.update(override)
    fused_add_rms_norm(
        args["x"], args["residual"], args["weight"], args["eps"], backend=args.get("backend", "torch")
    )


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(x=torch.randn(3, 8, dtype=torch.float64)), "x: dtype"),
        (dict(x=torch.randn(3, 8, 2)), "x: expected 2-D"),
        (dict(x=torch.randn(8, 3).T), "x: the last dimension must be contiguous"),
        (dict(x=torch.randn(3, 0), residual=torch.randn(3, 0), weight=torch.ones(0)), "x: hidden size"),
        (dict(weight=torch.ones(9)), "weight: has 9 entries"),
        (dict(weight=torch.ones(8, dtype=torch.float16)), "weight: dtype .* differs from x"),
        (dict(weight=torch.ones(16)[::2]), "weight: must be contiguous"),
        (dict(weight="w"), "weight: expected a torch.Tensor"),
        (dict(residual=torch.randn(3, 9)), "residual: shape"),
        (dict(residual=torch.randn(3, 8).half()), "residual: dtype"),
        (dict(eps=-1.0), "eps: expected a finite number"),
        (dict(eps=float("nan")), "eps: expected a finite number"),
        (dict(backend="cuda"), "backend: 'cuda' is not one of"),
    ],
)
def test_norm_errors_name_the_argument(override, match) -> None:
    with pytest.raises(ValueError, match=match):
        _norm_call(**override)
    if "residual" not in override and "backend" not in override:
        x = override.get("x", torch.randn(3, 8))
        with pytest.raises(ValueError, match=match):
            rms_norm(x, override.get("weight", torch.ones(8)), override.get("eps", EPS))


def test_residual_must_not_alias_x() -> None:
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="residual: must not be the same memory"):
        fused_add_rms_norm(x, x, torch.ones(8), EPS)


@pytest.mark.parametrize(
    "gate_up,out,match",
    [
        (torch.randn(3, 7), None, "gate_up: needs an even"),
        (torch.randn(3, 8).int(), None, "gate_up: dtype"),
        (torch.randn(3, 0), None, "gate_up: needs an even, non-zero"),
        (torch.randn(6, 3).T, None, "gate_up: the last dimension"),
        (torch.randn(3, 8), torch.empty(3, 5), "out: shape"),
        (torch.randn(3, 8), torch.empty(3, 4).half(), "out: dtype"),
        (torch.randn(3, 8), torch.empty(4, 3).T, "out: the last dimension"),
    ],
)
def test_silu_errors_name_the_argument(gate_up, out, match) -> None:
    with pytest.raises(ValueError, match=match):
        silu_and_mul(gate_up, out)


def _rope_call(**override):
    hq, hkv, d, T = 2, 1, 4, 3
    args = dict(
        qkv=torch.randn(T, (hq + 2 * hkv) * d),
        cos=torch.randn(T, d),
        sin=torch.randn(T, d),
        k_cache=torch.zeros(2, 4, hkv, d),
        v_cache=torch.zeros(2, 4, hkv, d),
        slot_mapping=torch.tensor([0, 5, -1]),
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
    )
    args.update(override)
    tensors = [args.pop(k) for k in ("qkv", "cos", "sin", "k_cache", "v_cache", "slot_mapping")]
    rope_and_cache(*tensors, **args)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(num_q_heads=0), "num_q_heads: expected an integer"),
        (dict(num_kv_heads=1.0), "num_kv_heads: expected an integer"),
        (dict(head_dim=3), "head_dim: must be even"),
        (dict(qkv=torch.randn(3, 17)), "qkv: has 17 columns"),
        (dict(qkv=torch.randn(3, 16).long()), "qkv: dtype"),
        (dict(qkv=torch.randn(16, 3).T), "qkv: the last dimension"),
        (dict(cos=torch.randn(3, 5)), r"cos: shape \(3, 5\)"),
        (dict(sin=torch.randn(2, 4)), r"sin: shape \(2, 4\)"),
        (dict(sin=torch.randn(3, 4).half()), "sin: dtype .* differs from cos"),
        (dict(cos=torch.randn(4, 3).T), "cos: the last dimension"),
        (dict(k_cache=torch.zeros(2, 4, 2, 4)), "k_cache: shape"),
        (dict(k_cache=torch.zeros(4, 2, 1, 4).transpose(0, 1)), "k_cache: must be contiguous"),
        (dict(v_cache=torch.zeros(3, 4, 1, 4)), "v_cache: .* differs from k_cache"),
        (dict(v_cache=torch.zeros(2, 4, 1, 4).half()), "v_cache: .* differs from k_cache"),
        (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), "slot_mapping: dtype"),
        (dict(slot_mapping=torch.tensor([0, 1])), "slot_mapping: has 2 entries"),
        (dict(slot_mapping=torch.tensor([0, 9, 1, 9, 2])[::2]), "slot_mapping: must be contiguous"),
        (dict(slot_mapping=torch.tensor([0, 8, 1])), "slot_mapping: slot 8 is past the cache's 8 slots"),
        (dict(backend="gpu"), "backend:"),
    ],
)
def test_rope_errors_name_the_argument(override, match) -> None:
    with pytest.raises(ValueError, match=match):
        _rope_call(**override)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend: triton on CPU tensors needs TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 4), torch.ones(4), EPS, backend="triton")
    assert fused_ops.rms_norm(torch.randn(2, 4), torch.ones(4), EPS, backend="torch").shape == (2, 4)
