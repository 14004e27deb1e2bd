"""GPU-resident LoRA weights: one stack of ``n_slots`` adapters per (layer, projection).

The model reads a ``ProjLora`` per projection and hands its stacks to the SGMV kernels with the
batch's segment slots; the adapter cache decides which adapter lives in which slot and calls
``write_slot`` / ``clear_slot``. Adapters of different ranks share the stacks: each is zero-padded
to ``r_max`` and its true rank is recorded in ``ranks`` so the kernels never read the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorafleet.worker.adapters import AdapterWeights

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ProjLora:
    """One projection of one layer, all GPU slots."""

    a: torch.Tensor  # [n_slots, r_max, h_in]  PEFT lora_A.weight per slot, zero rows past the rank
    b: torch.Tensor  # [n_slots, h_out, r_max] PEFT lora_B.weight per slot, zero columns past the rank
    ranks: torch.Tensor  # [n_slots] int32 true rank per slot (0 = the slot's adapter skips this proj)
    scales: torch.Tensor  # [n_slots] float32 lora_alpha / r (or / sqrt(r) for rsLoRA)
    # ranks and scales are rows of per-layer [n_projections, n_slots] tables (see rank_scale_tables).


class LoraSlotPool:
    """Fixed-size slot stacks for every targeted projection of every layer."""

    def __init__(
        self,
        num_layers: int,
        shapes: dict[str, tuple[int, int]],
        n_slots: int,
        r_max: int,
        dtype: torch.dtype | str,
        device: torch.device | str,
        target_modules: tuple[str, ...] = PROJECTIONS,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        if r_max < 1:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        unknown = [p for p in target_modules if p not in PROJECTIONS]
        if unknown:
            raise ValueError(f"target_modules: unknown projection {unknown[0]!r}; known: {PROJECTIONS}")
        missing = [p for p in target_modules if p not in shapes]
        if missing:
            raise ValueError(f"shapes: no (h_in, h_out) given for targeted projection {missing[0]!r}")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.num_layers = num_layers
        self.n_slots = n_slots
        self.r_max = r_max
        self.dtype: torch.dtype = dtype
        self.device = torch.device(device)
        self.target_modules: tuple[str, ...] = tuple(p for p in PROJECTIONS if p in target_modules)
        self.shapes = {p: (int(shapes[p][0]), int(shapes[p][1])) for p in self.target_modules}
        self._projs: dict[tuple[int, str], ProjLora] = {}
        self._row = {proj: i for i, proj in enumerate(self.target_modules)}
        n_proj = len(self.target_modules)
        self._tables = [
            (
                torch.zeros(n_proj, n_slots, dtype=torch.int32, device=self.device),
                torch.zeros(n_proj, n_slots, dtype=torch.float32, device=self.device),
            )
            for _ in range(num_layers)
        ]
        for layer in range(num_layers):
            ranks, scales = self._tables[layer]
            for proj in self.target_modules:
                h_in, h_out = self.shapes[proj]
                self._projs[(layer, proj)] = ProjLora(
                    a=torch.zeros(n_slots, r_max, h_in, dtype=dtype, device=self.device),
                    b=torch.zeros(n_slots, h_out, r_max, dtype=dtype, device=self.device),
                    ranks=ranks[self._row[proj]],
                    scales=scales[self._row[proj]],
                )

    def get(self, layer: int, proj: str) -> ProjLora | None:
        """The slot stacks of ``proj`` in ``layer``; None when the pool does not target ``proj``."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        if proj not in PROJECTIONS:
            raise ValueError(f"unknown projection {proj!r}; known: {PROJECTIONS}")
        return self._projs.get((layer, proj))

    def rank_scale_tables(self, layer: int, projs: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[len(projs), n_slots]`` rank and scale tables for the slices of one fused projection.

        Adjacent targeted projections (q|k|v, gate|up) are consecutive rows of the layer's tables,
        so this is a view the kernels take as is; building the tables per call would cost two small
        copy kernels per fused projection per layer per step.
        """
        rows = [self._row[p] for p in projs]
        ranks, scales = self._tables[layer]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return ranks[rows[0] : rows[-1] + 1], scales[rows[0] : rows[-1] + 1]
        return ranks[rows], scales[rows]

    @property
    def nbytes(self) -> int:
        return sum(p.a.nbytes + p.b.nbytes + p.ranks.nbytes + p.scales.nbytes for p in self._projs.values())

    def check_fits(self, weights: AdapterWeights) -> None:
        """Raise ValueError when ``weights`` cannot live in a slot of this pool."""
        for (layer, proj), pw in weights.projs.items():
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"adapter {weights.name!r}: layer {layer} outside [0, {self.num_layers})")
            if proj not in self.target_modules:
                raise ValueError(
                    f"adapter {weights.name!r} targets {proj}, which the engine's LoRA pool does not "
                    f"hold (lora_target_modules={self.target_modules})"
                )
            rank = pw.a.shape[0]
            if rank > self.r_max:
                raise ValueError(
                    f"adapter {weights.name!r}: rank {rank} of layer {layer} {proj} exceeds the pool's "
                    f"max_lora_rank {self.r_max}"
                )
            h_in, h_out = self.shapes[proj]
            if tuple(pw.a.shape) != (rank, h_in) or tuple(pw.b.shape) != (h_out, rank):
                raise ValueError(
                    f"adapter {weights.name!r}: layer {layer} {proj} has A {tuple(pw.a.shape)} / "
                    f"B {tuple(pw.b.shape)}, expected ({rank}, {h_in}) / ({h_out}, {rank})"
                )

    def write_slot(self, slot: int, weights: AdapterWeights, *, non_blocking: bool = False) -> None:
        """Copy ``weights`` into ``slot`` (zero-padding to ``r_max``) on the current stream.

        With ``non_blocking`` and pinned host tensors the copies are asynchronous; the caller keeps
        the host tensors alive and orders later reads of the slot after them (an event).
        """
        self._check_slot(slot)
        self.check_fits(weights)
        for (layer, proj), pl in self._projs.items():
            pw = weights.projs.get((layer, proj))
            if pw is None:
                pl.a[slot].zero_()
                pl.b[slot].zero_()
                pl.ranks[slot] = 0
                pl.scales[slot] = 0.0
                continue
            rank = pw.a.shape[0]
            pl.a[slot, :rank].copy_(pw.a, non_blocking=non_blocking)
            pl.b[slot, :, :rank].copy_(pw.b, non_blocking=non_blocking)
            if rank < self.r_max:
                pl.a[slot, rank:].zero_()
                pl.b[slot, :, rank:].zero_()
            pl.ranks[slot] = rank
            pl.scales[slot] = float(pw.scale)

    def clear_slot(self, slot: int) -> None:
        """Make ``slot`` a no-op adapter (rank 0 everywhere)."""
        self._check_slot(slot)
        for pl in self._projs.values():
            pl.a[slot].zero_()
            pl.b[slot].zero_()
            pl.ranks[slot] = 0
            pl.scales[slot] = 0.0

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot!r} outside [0, {self.n_slots})")
