"""Fused elementwise kernels on a real GPU: bf16/f16 at Llama-7B sizes against the torch path, and
CUDA-graph capture + replay with new inputs."""

from __future__ import annotations

import pytest
import torch

from lorafleet.kernels.fused_ops import fused_add_rms_norm, rms_norm, rope_and_cache, silu_and_mul
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.rope import RotaryEmbedding

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]
# One rounding step of the dtype (the Triton path rounds once where torch rounds two or three times,
# and its float32 reductions and transcendental functions may differ in the last bit).
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
H, INTER, HQ, D = 4096, 11008, 32, 128
EPS = 1e-5


def rand(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)


def rope_inputs(T, hkv, dtype, *, seed=0, block_size=16, num_blocks=64):
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32000,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=HQ,
        num_key_value_heads=hkv,
        head_dim=D,
        max_position_embeddings=4096,
    )
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (T,), generator=g).cuda()
    cos, sin = RotaryEmbedding(cfg, "cuda").cos_sin(positions, dtype)
    qkv = rand(T, (HQ + 2 * hkv) * D, dtype=dtype, seed=seed + 1)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[::5] = -1  # some padded rows
    k_cache = torch.full((num_blocks, block_size, hkv, D), float("nan"), dtype=dtype, device="cuda")
    return qkv, cos, sin, k_cache, k_cache.clone(), slots.cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 256])
def test_norms_at_model_size(dtype, T) -> None:
    tol = TOL[dtype]
    x = rand(T, H, dtype=dtype, seed=T)
    w = rand(H, dtype=dtype, seed=99, scale=0.1) + 1
    got = rms_norm(x, w, EPS)
    torch.testing.assert_close(got, rms_norm(x, w, EPS, backend="torch"), rtol=tol, atol=tol)
    res = rand(T, H, dtype=dtype, seed=T + 1, scale=4.0)
    xt, rt = x.clone(), res.clone()
    fused_add_rms_norm(xt, rt, w, EPS)
    xr, rr = x.clone(), res.clone()
    fused_add_rms_norm(xr, rr, w, EPS, backend="torch")
    assert torch.equal(rt, rr)  # the residual sum rounds exactly as torch's add
    torch.testing.assert_close(xt, xr, rtol=tol, atol=tol)


def test_rms_norm_wide_rows_loop() -> None:
    """Rows wider than the in-register limit take the two-pass path (and a non-power-of-two H)."""
    x = rand(3, 20000, dtype=torch.bfloat16, seed=5)
    w = rand(20000, dtype=torch.bfloat16, seed=6)
    res = rand(3, 20000, dtype=torch.bfloat16, seed=7)
    torch.testing.assert_close(
        rms_norm(x, w, EPS), rms_norm(x, w, EPS, backend="torch"), rtol=2e-2, atol=2e-2
    )
    xt, rt, xr, rr = x.clone(), res.clone(), x.clone(), res.clone()
    fused_add_rms_norm(xt, rt, w, EPS)
    fused_add_rms_norm(xr, rr, w, EPS, backend="torch")
    assert torch.equal(rt, rr)
    torch.testing.assert_close(xt, xr, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 256])
def test_silu_and_mul_at_model_size(dtype, T) -> None:
    gate_up = rand(T, 2 * INTER, dtype=dtype, seed=T, scale=3.0)
    out = torch.full((T, INTER), float("nan"), dtype=dtype, device="cuda")
    silu_and_mul(gate_up, out)
    assert not out.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(out, silu_and_mul(gate_up, backend="torch"), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv", [32, 8], ids=["mha", "gqa"])
@pytest.mark.parametrize("T", [1, 7, 256])
def test_rope_and_cache_at_model_size(dtype, hkv, T) -> None:
    qkv, cos, sin, kc, vc, slots = rope_inputs(T, hkv, dtype, seed=T)
    ref = [t.clone() for t in (qkv, kc, vc)]
    rope_and_cache(qkv, cos, sin, kc, vc, slots, num_q_heads=HQ, num_kv_heads=hkv, head_dim=D)
    rope_and_cache(
        ref[0], cos, sin, ref[1], ref[2], slots, num_q_heads=HQ, num_kv_heads=hkv, head_dim=D, backend="torch"
    )
    tol = TOL[dtype]
    torch.testing.assert_close(qkv, ref[0], rtol=tol, atol=tol)
    written = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool, device="cuda")
    written[slots[slots >= 0]] = True
    for got, want in ((kc, ref[1]), (vc, ref[2])):
        flat, flat_want = got.view(-1, hkv, D), want.view(-1, hkv, D)
        assert not flat[written].isnan().any() and flat[~written].isnan().all()
        torch.testing.assert_close(flat[written], flat_want[written], rtol=tol, atol=tol)


def test_cuda_graph_capture_and_replay_with_new_inputs() -> None:
    """All four operators captured in one graph over static buffers; each replay after copying new
    inputs (and new slots) in matches the eager torch path."""
    dtype, T, hkv = torch.bfloat16, 16, 8
    tol = TOL[dtype]
    qkv, cos, sin, kc, vc, slots = rope_inputs(T, hkv, dtype)
    x, res = rand(T, H, dtype=dtype, seed=1), rand(T, H, dtype=dtype, seed=2)
    w = rand(H, dtype=dtype, seed=3, scale=0.1) + 1
    gate_up = rand(T, 2 * INTER, dtype=dtype, seed=4)
    act = torch.empty(T, INTER, dtype=dtype, device="cuda")

    def step():
        normed = rms_norm(x, w, EPS)
        fused_add_rms_norm(x, res, w, EPS)
        rope_and_cache(qkv, cos, sin, kc, vc, slots, num_q_heads=HQ, num_kv_heads=hkv, head_dim=D)
        silu_and_mul(gate_up, act)
        return normed

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed = step()

    for seed in (10, 20):
        new_qkv, new_cos, new_sin, _, _, new_slots = rope_inputs(T, hkv, dtype, seed=seed)
        inputs = {
            "x": rand(T, H, dtype=dtype, seed=seed),
            "res": rand(T, H, dtype=dtype, seed=seed + 1),
            "gate_up": rand(T, 2 * INTER, dtype=dtype, seed=seed + 2),
        }
        kc.fill_(float("nan"))
        vc.fill_(float("nan"))
        ref_kc, ref_vc = kc.clone(), vc.clone()
        for static, new in ((qkv, new_qkv), (cos, new_cos), (sin, new_sin), (slots, new_slots)):
            static.copy_(new)
        x.copy_(inputs["x"])
        res.copy_(inputs["res"])
        gate_up.copy_(inputs["gate_up"])
        graph.replay()
        torch.cuda.synchronize()

        torch.testing.assert_close(normed, rms_norm(inputs["x"], w, EPS, backend="torch"), rtol=tol, atol=tol)
        ref_x, ref_res = inputs["x"].clone(), inputs["res"].clone()
        fused_add_rms_norm(ref_x, ref_res, w, EPS, backend="torch")
        assert torch.equal(res, ref_res)
        torch.testing.assert_close(x, ref_x, rtol=tol, atol=tol)
        ref_qkv = new_qkv.clone()
        rope_and_cache(
            ref_qkv, new_cos, new_sin, ref_kc, ref_vc, new_slots,
            num_q_heads=HQ, num_kv_heads=hkv, head_dim=D, backend="torch",
        )  # fmt: skip
        torch.testing.assert_close(qkv, ref_qkv, rtol=tol, atol=tol)
        torch.testing.assert_close(kc, ref_kc, rtol=tol, atol=tol, equal_nan=True)
        torch.testing.assert_close(vc, ref_vc, rtol=tol, atol=tol, equal_nan=True)
        torch.testing.assert_close(act, silu_and_mul(inputs["gate_up"], backend="torch"), rtol=tol, atol=tol)


def test_empty_batch_launches_nothing_on_cuda() -> None:
    w = torch.ones(H, dtype=torch.bfloat16, device="cuda")
    x = torch.empty(0, H, dtype=torch.bfloat16, device="cuda")
    assert rms_norm(x, w, EPS).shape == (0, H)
    fused_add_rms_norm(x, x.clone(), w, EPS)
    assert silu_and_mul(torch.empty(0, 2 * INTER, dtype=torch.bfloat16, device="cuda")).shape == (0, INTER)
    qkv, cos, sin, kc, vc, slots = rope_inputs(0, 8, torch.bfloat16)
    rope_and_cache(qkv, cos, sin, kc, vc, slots, num_q_heads=HQ, num_kv_heads=8, head_dim=D)
    assert kc.isnan().all()
