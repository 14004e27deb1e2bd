"""Decoder building blocks: RMSNorm (fused with the residual add), fused projections with multi-LoRA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lorafleet.kernels import add_lora_slices
from lorafleet.kernels.fused_ops import fused_add_rms_norm, rms_norm
from lorafleet.kernels.lora_ops import LoraShrunk, expand_slices, shrink_slices

if TYPE_CHECKING:
    from lorafleet.worker.batch import BatchLayout
    from lorafleet.worker.lora_pool import LoraSlotPool


class RMSNorm(torch.nn.Module):
    """Root-mean-square norm, statistics in float32 as the reference computes them."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual += x`` then return the norm of it, written over ``x`` (one launch on CUDA)."""
        fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x


class FusedLinear(torch.nn.Module):
    """Several projections of the same input in one matmul (q|k|v, gate|up, or just one).

    The output's column ranges are the slices, in order; LoRA adds to each slice through column
    views of the fused output, which keep a contiguous last dimension as the kernels require.
    """

    def __init__(
        self,
        in_features: int,
        slices: dict[str, int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.slice_names: tuple[str, ...] = tuple(slices)
        self.slice_widths: tuple[int, ...] = tuple(slices.values())
        offsets, acc = [], 0
        for w in self.slice_widths:
            offsets.append(acc)
            acc += w
        self.slice_offsets: tuple[int, ...] = tuple(offsets)
        self.out_features = acc
        self.weight = torch.nn.Parameter(
            torch.empty(acc, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            torch.nn.Parameter(torch.zeros(acc, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        lora: LoraSlotPool | None = None,
        layer: int = 0,
        batch: BatchLayout | None = None,
    ) -> torch.Tensor:
        if lora is None or batch is None:
            return F.linear(x, self.weight, self.bias)
        side = lora.stream
        if side is None:
            y = F.linear(x, self.weight, self.bias)
            self.add_lora(y, x, lora, layer, batch)
            return y
        main = torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        if lora.side_mode == "shrink":
            # Only the shrink runs beside the base matmul (it reads the same x); the expand adds
            # into the matmul's output after it, so no delta buffer, memset or add is needed. The
            # partial sums are allocated on the side stream and read on this one without
            # record_stream: the side stream's next allocation comes after the next
            # ``side.wait_stream(main)``, which orders it after this expand.
            with torch.cuda.stream(side):
                shrunk = [
                    (run, self._shrink_run(run, x, lora, layer, batch)) for run in self._runs(lora, layer)
                ]
            y = F.linear(x, self.weight, self.bias)
            main.wait_stream(side)
            for run, part in shrunk:
                expand_slices(y[:, self._columns(run)], part)
            return y
        # "full": the LoRA kernels run on a second stream beside the base matmul and leave their
        # deltas in ``delta``; one add joins them. Each kernel's fixed cost (launch, ramp-up, tail)
        # then hides behind the matmul instead of adding to it. ``delta`` is allocated on this stream
        # and freed after the join, so no other work can take its memory while the side writes it.
        delta = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        with torch.cuda.stream(side):
            delta.zero_()
            self.add_lora(delta, x, lora, layer, batch)
        y = F.linear(x, self.weight, self.bias)
        main.wait_stream(side)
        return y.add_(delta)

    def add_lora(
        self, y: torch.Tensor, x: torch.Tensor, lora: LoraSlotPool, layer: int, batch: BatchLayout
    ) -> None:
        """Add each targeted slice's per-segment LoRA delta to ``y`` in place.

        Adjacent targeted slices go to the kernel together (one shrink + one expand launch for a
        fully targeted q|k|v); a slice the pool does not hold is skipped.
        """
        for run in self._runs(lora, layer):
            a, b, ranks, scales = self._run_operands(run, lora, layer)
            add_lora_slices(
                y[:, self._columns(run)],
                x,
                a,
                b,
                batch.lora_seg_indptr,
                batch.lora_seg_slots,
                ranks=ranks,
                scales=scales,
            )

    def _runs(self, lora: LoraSlotPool, layer: int) -> list[list[int]]:
        """Maximal runs of adjacent slices that the pool holds LoRA weights for."""
        runs: list[list[int]] = [[]]
        for i, name in enumerate(self.slice_names):
            if lora.get(layer, name) is not None:
                runs[-1].append(i)
            elif runs[-1]:
                runs.append([])
        return [run for run in runs if run]

    def _columns(self, run: list[int]) -> slice:
        return slice(self.slice_offsets[run[0]], self.slice_offsets[run[-1]] + self.slice_widths[run[-1]])

    def _run_operands(
        self, run: list[int], lora: LoraSlotPool, layer: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """A run's A and B stacks (slice order) and its [n_slices, n_slots] rank and scale tables."""
        names = [self.slice_names[i] for i in run]
        projs = [lora.get(layer, name) for name in names]
        ranks, scales = lora.rank_scale_tables(layer, names)
        return [p.a for p in projs], [p.b for p in projs], ranks, scales  # type: ignore[union-attr]

    def _shrink_run(
        self, run: list[int], x: torch.Tensor, lora: LoraSlotPool, layer: int, batch: BatchLayout
    ) -> LoraShrunk:
        a, b, ranks, scales = self._run_operands(run, lora, layer)
        return shrink_slices(x, a, b, batch.lora_seg_indptr, batch.lora_seg_slots, ranks=ranks, scales=scales)

    def load_slices(self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None = None) -> None:
        """Copy per-slice checkpoint tensors (in slice order) into the fused parameters."""
        if len(weights) != len(self.slice_names):
            raise ValueError(f"expected {len(self.slice_names)} weight slices, got {len(weights)}")
        for off, width, w in zip(self.slice_offsets, self.slice_widths, weights):
            self.weight[off : off + width].copy_(w)
        if self.bias is not None:
            if biases is None or len(biases) != len(self.slice_names):
                raise ValueError(f"expected {len(self.slice_names)} bias slices")
            for off, width, b in zip(self.slice_offsets, self.slice_widths, biases):
                self.bias[off : off + width].copy_(b)
