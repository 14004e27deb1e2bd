"""Plain torch SGMV: the CPU path of ``add_lora`` and the oracle the Triton kernels are tested against.

It walks the segments on the host (reading ``seg_indptr``/``seg_slots`` back is a sync on CUDA), so it
is meant for the CPU and for tests, not for a GPU hot path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _segments(seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> list[tuple[int, int, int]]:
    bounds = seg_indptr.tolist()
    return [(bounds[s], bounds[s + 1], k) for s, k in enumerate(seg_slots.tolist()) if k >= 0]


def shrink_torch(
    x: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Returns ``[n_slices, T, r_max]`` float32: ``x[i] @ A_s[k, :rank].T``; zero elsewhere."""
    r_max = lora_as[0].shape[1]
    out = torch.zeros(len(lora_as), x.shape[0], r_max, dtype=torch.float32, device=x.device)
    rank_lists = [r.tolist() for r in ranks]
    for start, end, k in _segments(seg_indptr, seg_slots):
        if end <= start:
            continue
        xs = x[start:end].float()
        for s, a in enumerate(lora_as):
            r = rank_lists[s][k]
            out[s, start:end, :r] = xs @ a[k, :r].float().T
    return out


def expand_torch(
    y: torch.Tensor,
    inter: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    offsets: Sequence[int],
) -> None:
    """``y[i, off_s:off_s+w_s] += scale_s[k] * inter[s, i, :rank] @ B_s[k, :, :rank].T`` in place."""
    rank_lists = [r.tolist() for r in ranks]
    scale_lists = [c.tolist() for c in scales]
    for start, end, k in _segments(seg_indptr, seg_slots):
        if end <= start:
            continue
        for s, b in enumerate(lora_bs):
            r, c, off, w = rank_lists[s][k], scale_lists[s][k], offsets[s], b.shape[1]
            delta = (inter[s, start:end, :r].float() * c) @ b[k, :, :r].float().T
            view = y[start:end, off : off + w]
            view.copy_((view.float() + delta).to(y.dtype))
