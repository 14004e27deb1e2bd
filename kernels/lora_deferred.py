"""Multi-LoRA split at the intermediate: shrink now, expand inside the kernel that next reads the output.

``add_lora_slices`` costs two launches per projection, and the expand's is mostly fixed cost (launch,
ramp-up, a read-modify-write of y) when a decode batch has a row or so per adapter. The expand's
math is per row and per output column, so the elementwise kernel that reads the projection's
output next (RoPE + KV write after q|k|v, SiLU·up after gate|up) can add the delta as it loads each
column. ``shrink_lora_slices`` runs the shrink and returns a ``PendingLoraDelta``; a consumer either
fuses it (``kernels/fused_ops.py``, Triton) or calls ``apply`` first, which is exactly the expand
``add_lora_slices`` would have run, so both ways give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.kernels import sgmv_torch
from lorafleet.kernels.dispatch import fail, resolve_backend
from lorafleet.kernels.lora_ops import _validate


@dataclass(frozen=True)
class PendingLoraDelta:
    """``y[i, cols_s : cols_s + w_s] += scales[s, k] * sum_p(partials[p, s, i, :r]) @ lora_bs[s][k, :, :r].T``
    for every slice s, row i of a segment with slot k >= 0, r = ranks[s, k]; not applied yet.

    partials: [n_splits, n_slices, T, r_max] float32 (the shrink's split-K partial sums)
    lora_bs:  per slice [n_slots, w_s, r_max], contiguous, y's dtype
    seg_indptr [S+1], seg_slots [S]: int32, as for ``add_lora``
    ranks [n_slices, n_slots] int32, scales [n_slices, n_slots] float32 (rows may be views)
    cols:     first column of each slice in the consumer's y, increasing, slices not overlapping
    backend:  "triton" or "torch": the backend that made ``partials``, which ``apply`` uses too
    """

    partials: torch.Tensor
    lora_bs: tuple[torch.Tensor, ...]
    seg_indptr: torch.Tensor
    seg_slots: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    cols: tuple[int, ...]
    backend: str

    @property
    def num_rows(self) -> int:
        return int(self.partials.shape[2])

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(b.shape[1]) for b in self.lora_bs)

    @property
    def end_col(self) -> int:
        return self.cols[-1] + self.widths[-1]

    def check_target(self, y: torch.Tensor, name: str) -> None:
        """Raise ValueError unless ``y`` is an output this delta can be added to."""
        if y.device != self.partials.device:
            fail(name, f"on {y.device}, the pending LoRA delta on {self.partials.device}")
        if y.dtype != self.lora_bs[0].dtype:
            fail(name, f"dtype {y.dtype} differs from the pending LoRA delta's {self.lora_bs[0].dtype}")
        if y.shape[0] != self.num_rows:
            fail(name, f"has {y.shape[0]} rows, the pending LoRA delta {self.num_rows}")
        if self.end_col > y.shape[1]:
            fail(name, f"has {y.shape[1]} columns, the pending LoRA delta reaches column {self.end_col}")

    def apply(self, y: torch.Tensor) -> None:
        """Add the delta to ``y`` in place (the expand of ``add_lora_slices``), one launch per run
        of adjacent slices."""
        self.check_target(y, "y")
        n = len(self.lora_bs)
        start = 0
        for i in range(1, n + 1):
            if i < n and self.cols[i] == self.cols[i - 1] + self.widths[i - 1]:
                continue
            self._expand_run(y, start, i)
            start = i

    def _expand_run(self, y: torch.Tensor, i: int, j: int) -> None:
        view = y[:, self.cols[i] : self.cols[j - 1] + self.widths[j - 1]]
        bs = list(self.lora_bs[i:j])
        ranks, scales = self.ranks[i:j], self.scales[i:j]
        if self.backend == "torch":
            offsets = [c - self.cols[i] for c in self.cols[i:j]]
            inter = self.partials[:, i:j].sum(0)
            sgmv_torch.expand_torch(
                view, inter, bs, self.seg_indptr, self.seg_slots, list(ranks), list(scales), offsets
            )
            return
        from lorafleet.kernels import sgmv_launch

        sgmv_launch.expand(view, self.partials[:, i:j], bs, self.seg_indptr, self.seg_slots, ranks, scales)


def shrink_lora_slices(
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    *,
    cols: Sequence[int],
    ranks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scales: torch.Tensor | Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> PendingLoraDelta:
    """The shrink of ``add_lora_slices`` now, its expand left to the output's consumer.

    x:      [T, h_in] float16 / bfloat16 / float32, last dim contiguous
    lora_a: 1..3 stacks [n_slots, r_max, h_in]; lora_b: as many [n_slots, w_s, r_max] (x's dtype)
    seg_indptr [S+1], seg_slots [S]: int32; ranks / scales: as for ``add_lora_slices``
    cols:   first output column of each slice, increasing and not overlapping (non-adjacent slices,
            such as q and v without k, are allowed)
    returns the ``PendingLoraDelta`` (one shrink launch on the Triton path)
    """
    c = _validate(None, x, lora_a, lora_b, seg_indptr, seg_slots, ranks, scales)
    assert c.lora_as is not None and c.lora_bs is not None
    cols = tuple(cols)
    widths = [b.shape[1] for b in c.lora_bs]
    if len(cols) != len(c.lora_bs):
        fail("cols", f"{len(cols)} column offsets for {len(c.lora_bs)} slices")
    for i, col in enumerate(cols):
        if isinstance(col, bool) or not isinstance(col, int) or col < 0:
            fail("cols", f"expected integers >= 0, got {col!r}")
        if i and col < cols[i - 1] + widths[i - 1]:
            fail("cols", f"slice {i} starts at {col}, inside slice {i - 1} ({cols[i - 1]} + {widths[i - 1]})")
    use = resolve_backend(backend, x.device)
    if use == "torch":
        partials = sgmv_torch.shrink_torch(x, c.lora_as, seg_indptr, seg_slots, list(c.ranks))[None]
    else:
        from lorafleet.kernels import sgmv_launch

        partials = sgmv_launch.shrink(x, c.lora_as, seg_indptr, seg_slots, c.ranks, zero_fill=False)
    return PendingLoraDelta(partials, tuple(c.lora_bs), seg_indptr, seg_slots, c.ranks, c.scales, cols, use)
