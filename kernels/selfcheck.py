"""A quick numeric self-check of the SGMV operators against a float64 reference.

``lorafleet selfcheck`` runs it: on CUDA it checks the Triton kernels in bfloat16; on the CPU it
checks the torch path, and the Triton kernels too when TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lorafleet.kernels.lora_ops import add_lora


@dataclass(frozen=True)
class CheckResult:
    backend: str
    dtype: str
    popularity: str
    rel_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance


def reference_add_lora(y, x, lora_a, lora_b, seg_indptr, seg_slots, ranks, scales) -> torch.Tensor:
    """Float64 loop reference of ``add_lora``; returns a new float64 tensor."""
    out = y.double().clone()
    bounds, slots = seg_indptr.tolist(), seg_slots.tolist()
    for s, k in enumerate(slots):
        if k < 0:
            continue
        lo, hi, r = bounds[s], bounds[s + 1], int(ranks[k])
        delta = (x[lo:hi].double() @ lora_a[k, :r].double().T) @ lora_b[k, :, :r].double().T
        out[lo:hi] += float(scales[k]) * delta
    return out


def popularity_slots(popularity: str, num_tokens: int, n_slots: int, gen: torch.Generator) -> list[int]:
    """Adapter slot of each token under Punica's workloads, grouped by adapter (sorted)."""
    if popularity == "identical":
        ids = [0] * num_tokens
    elif popularity == "distinct":
        ids = list(range(num_tokens))
    elif popularity == "uniform":
        n = max(1, int(-(-(num_tokens**0.5) // 1)))
        ids = torch.randint(0, n, (num_tokens,), generator=gen).tolist()
    elif popularity == "skewed":
        weights = torch.tensor([1.5 ** (-i) for i in range(num_tokens)], dtype=torch.float64)
        ids = torch.multinomial(weights, num_tokens, replacement=True, generator=gen).tolist()
    else:
        raise ValueError(f"unknown popularity {popularity!r}")
    # Map adapter ids to distinct pool slots spread over the pool.
    perm = torch.randperm(n_slots, generator=gen).tolist()
    return sorted(perm[i % n_slots] for i in ids)


def segments_from_slots(token_slots: list[int]) -> tuple[list[int], list[int]]:
    indptr, slots = [0], []
    for i, k in enumerate(token_slots):
        if slots and slots[-1] == k:
            indptr[-1] = i + 1
        else:
            slots.append(k)
            indptr.append(i + 1)
    return indptr, slots


def run_selfcheck(device: str | None = None, seed: int = 0) -> list[CheckResult]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    cases: list[tuple[str, torch.dtype, float]] = []
    if dev.type == "cuda":
        cases = [("triton", torch.bfloat16, 2e-2), ("triton", torch.float16, 5e-3)]
    else:
        cases = [("torch", torch.float32, 1e-5)]
        if os.environ.get("TRITON_INTERPRET") == "1":
            cases.append(("triton", torch.float16, 5e-3))
    T, h_in, h_out, n_slots, r_max = 24, 64, 48, 32, 16
    results = []
    for backend, dtype, tol in cases:
        for popularity in ("distinct", "uniform", "skewed", "identical"):
            token_slots = popularity_slots(popularity, T, n_slots, gen)
            indptr, slots = segments_from_slots(token_slots)
            x = torch.randn(T, h_in, generator=gen).to(dev, dtype)
            y = torch.randn(T, h_out, generator=gen).to(dev, dtype)
            a = (torch.randn(n_slots, r_max, h_in, generator=gen) / h_in**0.5).to(dev, dtype)
            b = (torch.randn(n_slots, h_out, r_max, generator=gen) / r_max**0.5).to(dev, dtype)
            ranks = torch.randint(1, r_max + 1, (n_slots,), generator=gen, dtype=torch.int32).to(dev)
            scales = torch.rand(n_slots, generator=gen).to(dev)
            seg_indptr = torch.tensor(indptr, dtype=torch.int32, device=dev)
            seg_slots = torch.tensor(slots, dtype=torch.int32, device=dev)
            ref = reference_add_lora(y, x, a, b, seg_indptr, seg_slots, ranks, scales)
            add_lora(y, x, a, b, seg_indptr, seg_slots, ranks=ranks, scales=scales, backend=backend)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            results.append(CheckResult(backend, str(dtype).removeprefix("torch."), popularity, err, tol))
    return results
