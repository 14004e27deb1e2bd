"""The multi-tensor scatter behind packed adapter uploads: Triton (interpreted on CPU) and torch."""

from __future__ import annotations

import os

import pytest
import torch

from lorafleet.kernels.slot_scatter import make_plan, slot_scatter

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _stacks(dtype: torch.dtype) -> list[torch.Tensor]:
    # Pieces of uneven sizes (some smaller than a block, some spanning several, one of 1 element)
    # that are slots of larger stacks, as the pool's A/B stacks are.
    return [
        torch.zeros(3, 5, 7, dtype=dtype),
        torch.zeros(3, 40, 2, dtype=dtype),
        torch.zeros(3, 1, dtype=dtype),
        torch.zeros(3, 16, dtype=dtype),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scatter_writes_each_piece_and_nothing_else(backend: str, dtype: torch.dtype) -> None:
    stacks = _stacks(dtype)
    slot = 1
    plan = make_plan([s[slot] for s in stacks])
    assert plan.total == 35 + 80 + 1 + 16 and plan.max_numel == 80
    src = torch.randn(plan.total + 3, dtype=dtype)  # a longer source: the tail is not read
    slot_scatter(src, plan, backend=backend, block=16)
    offset = 0
    for s in stacks:
        n = s[slot].numel()
        assert torch.equal(s[slot].reshape(-1), src[offset : offset + n])
        offset += n
        assert not s[0].any() and not s[2].any()  # neighbouring slots untouched


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs TRITON_INTERPRET=1")
def test_triton_matches_torch_with_default_block() -> None:
    dsts_t = [torch.zeros(n, dtype=torch.float16) for n in (5000, 4096, 3, 8191)]
    dsts_r = [torch.zeros_like(d) for d in dsts_t]
    src = torch.randn(sum(d.numel() for d in dsts_t), dtype=torch.float16)
    slot_scatter(src, make_plan(dsts_t), backend="triton")
    slot_scatter(src, make_plan(dsts_r), backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(dsts_t, dsts_r))


def test_bad_arguments() -> None:
    dst = torch.zeros(4, 4)
    plan = make_plan([dst[0], dst[2]])
    with pytest.raises(ValueError, match="at least one"):
        make_plan([])
    with pytest.raises(ValueError, match="contiguous"):
        make_plan([dst[:, 0]])
    with pytest.raises(ValueError, match=r"dsts\[1\]"):
        make_plan([dst[0], torch.zeros(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="plan writes"):
        slot_scatter(torch.zeros(8, dtype=torch.float64), plan)
    with pytest.raises(ValueError, match="reads 8"):
        slot_scatter(torch.zeros(7), plan)
    with pytest.raises(ValueError, match="1-D"):
        slot_scatter(torch.zeros(2, 4), plan)
    with pytest.raises(ValueError, match="backend"):
        slot_scatter(torch.zeros(8), plan, backend="cuda")
    with pytest.raises(ValueError, match="power of two"):
        slot_scatter(torch.zeros(8), plan, block=12)
