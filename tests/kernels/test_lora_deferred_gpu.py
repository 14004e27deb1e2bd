"""Deferred LoRA expand on a real GPU: the RoPE and SiLU kernels with a pending delta against the
separate expand followed by the plain kernel, in bf16 at Llama-7B sizes over the engine's decode
layout (one segment per row slot, the unused ones empty), and under CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from lorafleet.kernels.fused_ops import rope_and_cache, silu_and_mul
from lorafleet.kernels.lora_deferred import shrink_lora_slices

pytestmark = pytest.mark.gpu
H, INTER, HQ, D = 4096, 11008, 32, 128
N_SLOTS = 64
# The separate expand may take the tile kernel (tensor-core dot) where the fused one multiplies in
# registers: their float32 sums differ in order, so the bf16 results may differ by a rounding step.
TOL = 2e-2


def layout(T: int, popularity: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode graphs' layout: T segments; distinct = a row each, identical = all rows in the
    first; some rows without an adapter."""
    g = torch.Generator().manual_seed(seed)
    if popularity == "distinct":
        indptr = torch.arange(T + 1, dtype=torch.int32)
        slots = torch.randperm(N_SLOTS, generator=g)[: min(T, N_SLOTS)].repeat(T // N_SLOTS + 1)[:T]
        slots[3::7] = -1
    else:
        indptr = torch.full((T + 1,), T, dtype=torch.int32)
        indptr[0] = 0
        slots = torch.full((T,), -1, dtype=torch.int64)
        slots[0] = 5
    return indptr.cuda(), slots.to(torch.int32).cuda()


def stacks(h_in: int, widths, r_max: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, r_max + 1, (N_SLOTS,), generator=g, dtype=torch.int32)
    ranks[:8] = r_max
    a, b = [], []
    for w in widths:
        a.append((torch.randn(N_SLOTS, r_max, h_in, generator=g) * 0.05).to("cuda", torch.bfloat16))
        b.append((torch.randn(N_SLOTS, w, r_max, generator=g) * 0.05).to("cuda", torch.bfloat16))
    scales = (torch.rand(N_SLOTS, generator=g) + 0.5).cuda()
    return a, b, ranks.cuda(), scales


def x_rows(T: int, h: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, h, generator=g).to("cuda", torch.bfloat16)


@pytest.mark.parametrize("T", [1, 16, 64, 256])
@pytest.mark.parametrize("popularity", ["distinct", "identical"])
@pytest.mark.parametrize("r_max", [16, 64])
def test_silu_and_mul_fused_expand(T, popularity, r_max):
    indptr, slots = layout(T, popularity)
    a, b, ranks, scales = stacks(H, (INTER, INTER), r_max, seed=T)
    x = x_rows(T, H, 1)
    gate_up = x_rows(T, 2 * INTER, 2)
    pending = shrink_lora_slices(x, a, b, indptr, slots, cols=(0, INTER), ranks=ranks, scales=scales)
    ref_in = gate_up.clone()
    pending.apply(ref_in)
    want = silu_and_mul(ref_in)
    got = silu_and_mul(gate_up, lora=pending)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL, atol=TOL)
    assert (want.float() - silu_and_mul(gate_up).float()).abs().max() > 0.05


@pytest.mark.parametrize("T", [1, 64, 256])
@pytest.mark.parametrize("hkv", [32, 8])
@pytest.mark.parametrize("targets", ["qkv", "qv"])
def test_rope_and_cache_fused_expand(T, hkv, targets):
    indptr, slots = layout(T, "distinct", seed=T)
    widths = {"q": HQ * D, "k": hkv * D, "v": hkv * D}
    start = {"q": 0, "k": HQ * D, "v": (HQ + hkv) * D}
    a, b, ranks, scales = stacks(H, [widths[t] for t in targets], 16, seed=3)
    x = x_rows(T, H, 4)
    qkv = x_rows(T, (HQ + 2 * hkv) * D, 5)
    g = torch.Generator().manual_seed(6)
    ang = torch.rand(T, D // 2, generator=g) * 6.28
    cos = torch.cat([ang.cos(), ang.cos()], -1).to("cuda", torch.bfloat16)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to("cuda", torch.bfloat16)
    cache = torch.zeros(64, 16, hkv, D, dtype=torch.bfloat16, device="cuda")
    slot_mapping = torch.randperm(64 * 16, generator=g)[:T].cuda()
    slot_mapping[1::5] = -1
    kw = dict(num_q_heads=HQ, num_kv_heads=hkv, head_dim=D)
    pending = shrink_lora_slices(
        x, a, b, indptr, slots, cols=[start[t] for t in targets], ranks=ranks, scales=scales
    )
    ref_qkv, ref_k, ref_v = qkv.clone(), cache.clone(), cache.clone()
    pending.apply(ref_qkv)
    rope_and_cache(ref_qkv, cos, sin, ref_k, ref_v, slot_mapping, **kw)
    got_qkv, got_k, got_v = qkv.clone(), cache.clone(), cache.clone()
    rope_and_cache(got_qkv, cos, sin, got_k, got_v, slot_mapping, lora=pending, **kw)
    for got, want in ((got_qkv, ref_qkv), (got_k, ref_k), (got_v, ref_v)):
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL, atol=TOL)


def test_graph_replay_with_new_metadata():
    T = 64
    a, b, ranks, scales = stacks(H, (INTER, INTER), 16, seed=7)
    indptr, slots = layout(T, "distinct", seed=1)
    x = x_rows(T, H, 8)
    gate_up = x_rows(T, 2 * INTER, 9)
    out = torch.empty(T, INTER, dtype=torch.bfloat16, device="cuda")

    def step() -> None:
        pending = shrink_lora_slices(x, a, b, indptr, slots, cols=(0, INTER), ranks=ranks, scales=scales)
        silu_and_mul(gate_up, out, lora=pending)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed, popularity in ((2, "distinct"), (3, "identical")):
        new_indptr, new_slots = layout(T, popularity, seed=seed)
        indptr.copy_(new_indptr)
        slots.copy_(new_slots)
        x.copy_(x_rows(T, H, seed + 10))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        step()
        assert torch.equal(replayed, out)
