"""GPU-resident LoRA weights: one stack of ``n_slots`` adapters per (layer, projection).

The model reads a ``ProjLora`` per projection and hands its stacks to the SGMV kernels with the
batch's segment slots; the adapter cache decides which adapter lives in which slot and calls
``write_packed`` / ``clear_slot``. Adapters of different ranks share the stacks: each is zero-padded
to ``r_max`` and its true rank is recorded in ``ranks`` so the kernels never read the padding.

Uploads: ``pack`` lays an adapter out, once and off the critical path, in one flat host buffer that
mirrors one slot (every A and B already padded, then the slot's rank and scale columns), so
``write_packed`` is one host-to-device copy into a staging buffer, one multi-tensor scatter launch
and two small table copies, instead of ~6 operations per (layer, projection) (``write_slot``, kept as
the simple reference path).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lorafleet.kernels.slot_scatter import ScatterPlan, make_plan, slot_scatter

if TYPE_CHECKING:
    from lorafleet.worker.adapters import AdapterWeights

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ALIGN = 16  # bytes; keeps every typed view of a packed buffer aligned for vector copies


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class ProjLora:
    """One projection of one layer, all GPU slots."""

    a: torch.Tensor  # [n_slots, r_max, h_in]  PEFT lora_A.weight per slot, zero rows past the rank
    b: torch.Tensor  # [n_slots, h_out, r_max] PEFT lora_B.weight per slot, zero columns past the rank
    ranks: torch.Tensor  # [n_slots] int32 true rank per slot (0 = the slot's adapter skips this proj)
    scales: torch.Tensor  # [n_slots] float32 lora_alpha / r (or / sqrt(r) for rsLoRA)
    # ranks and scales are rows of the pool's [num_layers, n_projections, n_slots] tables.


@dataclass
class PackedAdapter:
    """One adapter in a pool's slot layout: a flat uint8 buffer (pinned on CUDA) ready to upload.

    Bytes: every targeted (layer, projection) in pool order, A as [r_max, h_in] then B as
    [h_out, r_max] (zero padded; zeros for projections the adapter skips), then the int32 ranks and
    float32 scales as [num_layers, n_projections] tables.
    """

    name: str
    source: str
    buffer: torch.Tensor
    layout: tuple[object, ...]  # the packing pool's signature; another pool refuses the buffer
    read_seconds: float = 0.0  # disk read + parse + validation (filled in by the loader)
    pack_seconds: float = 0.0  # pinned allocation + packing
    stages: dict[str, float] = field(default_factory=dict)  # the loader's seconds per step, for benchmarks

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


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
        # Where the model runs the LoRA kernels: None = on the caller's stream, after each base
        # matmul; a CUDA stream = beside it, all of them ("full") or the shrinks only ("shrink"),
        # as EngineConfig.lora_side_stream says.
        self.stream: torch.cuda.Stream | None = None
        self.side_mode = "full"
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
        # One table for all layers, so a slot's ranks (or scales) are one strided column to write.
        self._ranks = torch.zeros(num_layers, n_proj, n_slots, dtype=torch.int32, device=self.device)
        self._scales = torch.zeros(num_layers, n_proj, n_slots, dtype=torch.float32, device=self.device)
        for layer in range(num_layers):
            for proj in self.target_modules:
                h_in, h_out = self.shapes[proj]
                self._projs[(layer, proj)] = ProjLora(
                    a=torch.zeros(n_slots, r_max, h_in, dtype=dtype, device=self.device),
                    b=torch.zeros(n_slots, h_out, r_max, dtype=dtype, device=self.device),
                    ranks=self._ranks[layer, self._row[proj]],
                    scales=self._scales[layer, self._row[proj]],
                )
        # Packed layout: element offset of each (layer, proj)'s A (B follows it), in _projs order.
        self.packed_offsets: dict[tuple[int, str], int] = {}
        elems = 0
        for key, pl in self._projs.items():
            self.packed_offsets[key] = elems
            elems += pl.a[0].numel() + pl.b[0].numel()
        self._weight_elems = elems
        self._ranks_at = _align(elems * dtype.itemsize)
        self._scales_at = self._ranks_at + 4 * num_layers * n_proj
        self.packed_nbytes = _align(self._scales_at + 4 * num_layers * n_proj)
        self._signature: tuple[object, ...] = (
            num_layers, self.target_modules, tuple(self.shapes.items()), r_max, dtype,
        )  # fmt: skip
        self._plans: list[ScatterPlan] = [
            make_plan([t for pl in self._projs.values() for t in (pl.a[slot], pl.b[slot])])
            for slot in range(n_slots)
        ]
        # A device pool receives the packed bytes here first (one copy), then scatters them.
        self._staging: torch.Tensor | None = None
        if self.device.type != "cpu":
            self._staging = torch.zeros(self.packed_nbytes, dtype=torch.uint8, device=self.device)
            # Compiles the scatter kernel now rather than inside the first upload's engine step
            # (zeros into the still-empty slot 0: nothing changes).
            self._write_from(self._staging, 0)

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
        ranks, scales = self._ranks[layer], self._scales[layer]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return ranks[rows[0] : rows[-1] + 1], scales[rows[0] : rows[-1] + 1]
        return ranks[rows], scales[rows]

    @property
    def nbytes(self) -> int:
        return sum(p.a.nbytes + p.b.nbytes + p.ranks.nbytes + p.scales.nbytes for p in self._projs.values())

    def check_fits(self, weights: AdapterWeights) -> None:
        """Raise ValueError when ``weights`` cannot live in a slot of this pool."""
        shapes = [(lp[0], lp[1], tuple(pw.a.shape), tuple(pw.b.shape)) for lp, pw in weights.projs.items()]
        self.check_fits_shapes(weights.name, shapes)

    def check_fits_shapes(
        self, name: str, projs: Iterable[tuple[int, str, tuple[int, ...], tuple[int, ...]]]
    ) -> None:
        """Raise ValueError unless every (layer, proj, A shape, B shape) of adapter ``name`` fits a slot."""
        for layer, proj, a_shape, b_shape in projs:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"adapter {name!r}: layer {layer} outside [0, {self.num_layers})")
            if proj not in self.target_modules:
                raise ValueError(
                    f"adapter {name!r} targets {proj}, which the engine's LoRA pool does not "
                    f"hold (lora_target_modules={self.target_modules})"
                )
            rank = a_shape[0]
            if rank > self.r_max:
                raise ValueError(
                    f"adapter {name!r}: rank {rank} of layer {layer} {proj} exceeds the pool's "
                    f"max_lora_rank {self.r_max}"
                )
            h_in, h_out = self.shapes[proj]
            if tuple(a_shape) != (rank, h_in) or tuple(b_shape) != (h_out, rank):
                raise ValueError(
                    f"adapter {name!r}: layer {layer} {proj} has A {tuple(a_shape)} / "
                    f"B {tuple(b_shape)}, expected ({rank}, {h_in}) / ({h_out}, {rank})"
                )

    # --- packed uploads ---
    def weights_view(self, buffer: torch.Tensor) -> torch.Tensor:
        """The weights of a packed buffer, flat in the pool dtype."""
        return buffer[: self._weight_elems * self.dtype.itemsize].view(self.dtype)

    def views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights [elems] in the pool dtype, ranks [L, P] int32, scales [L, P] float32) of a buffer."""
        shape = (self.num_layers, len(self.target_modules))
        n = shape[0] * shape[1]
        weights = self.weights_view(buffer)
        ranks = buffer[self._ranks_at : self._ranks_at + 4 * n].view(torch.int32).view(shape)
        scales = buffer[self._scales_at : self._scales_at + 4 * n].view(torch.float32).view(shape)
        return weights, ranks, scales

    def new_buffer(self, *, pin: bool = False) -> torch.Tensor:
        """An uninitialised host buffer for one packed adapter (page-locked if ``pin``).

        Pinned buffers come from torch's caching host allocator, so a buffer freed after an upload is
        reused by the next load instead of being allocated and page-locked again."""
        return torch.empty(self.packed_nbytes, dtype=torch.uint8, pin_memory=pin)

    def finish_packed(
        self, name: str, source: str, buffer: torch.Tensor, projs: Iterable[tuple[int, str, int, float]]
    ) -> PackedAdapter:
        """Write the rank and scale tables of ``projs`` ((layer, proj, rank, scale); projections not
        listed get rank 0) and zero the alignment gaps of ``buffer``, whose weights are filled.

        Written through a memoryview (no torch calls): the loader thread runs this, and each torch
        call there lets a busy step thread keep Python's lock for up to a switch interval."""
        n_proj = len(self.target_modules)
        ranks = [0] * (self.num_layers * n_proj)
        scales = [0.0] * (self.num_layers * n_proj)
        for layer, proj, rank, scale in projs:
            ranks[layer * n_proj + self._row[proj]] = rank
            scales[layer * n_proj + self._row[proj]] = float(scale)
        mem = memoryview(buffer.numpy())
        # Native byte order and standard sizes: what the int32 / float32 views of the buffer read.
        struct.pack_into(f"={len(ranks)}i", mem, self._ranks_at, *ranks)
        struct.pack_into(f"={len(scales)}f", mem, self._scales_at, *scales)
        # The alignment gaps are never read; zero them so equal adapters give equal bytes.
        weights_end, tables_end = self._weight_elems * self.dtype.itemsize, self._scales_at + 4 * len(scales)
        mem[weights_end : self._ranks_at] = bytes(self._ranks_at - weights_end)
        mem[tables_end:] = bytes(self.packed_nbytes - tables_end)
        return PackedAdapter(name, source, buffer, self._signature)

    def pack(self, weights: AdapterWeights, *, pin: bool = False) -> PackedAdapter:
        """Lay ``weights`` out as one slot of this pool in a single host buffer (page-locked if ``pin``).

        The reference path from tensors in memory; the adapter cache reads files straight into this
        layout instead (``adapter_reader.read_packed``), which gives the same bytes.
        """
        self.check_fits(weights)
        buffer = self.new_buffer(pin=pin)
        flat, _, _ = self.views(buffer)
        r_max = self.r_max
        for (layer, proj), start in self.packed_offsets.items():
            h_in, h_out = self.shapes[proj]
            a = flat[start : start + r_max * h_in].view(r_max, h_in)
            b = flat[start + r_max * h_in : start + r_max * (h_in + h_out)].view(h_out, r_max)
            pw = weights.projs.get((layer, proj))
            if pw is None:  # rank 0: the kernels skip it, zeros keep the slot's contents defined
                a.zero_()
                b.zero_()
                continue
            rank = pw.rank
            a[:rank].copy_(pw.a)
            a[rank:].zero_()
            b[:, :rank].copy_(pw.b)
            b[:, rank:].zero_()
        projs = [(layer, proj, pw.rank, pw.scale) for (layer, proj), pw in weights.projs.items()]
        return self.finish_packed(weights.name, weights.source, buffer, projs)

    def weights_finite(self, buffer: torch.Tensor) -> bool:
        """Whether every weight of a packed buffer is finite: one min/max pass, which NaN and Inf
        always reach (a float32 sum, the earlier check, could also overflow on finite weights, and
        took 60-130 ms on 80 MB of bf16 against a few ms for this)."""
        if self._weight_elems == 0:
            return True
        lo, hi = torch.aminmax(self.weights_view(buffer))
        return math.isfinite(lo.item()) and math.isfinite(hi.item())

    def write_packed(self, slot: int, packed: PackedAdapter, *, non_blocking: bool = False) -> None:
        """Write ``packed`` into ``slot`` on the current stream.

        A device pool copies the whole buffer into its staging buffer (one host-to-device copy,
        asynchronous with ``non_blocking`` and a pinned buffer), scatters the weights in one launch
        and copies the rank and scale columns: four operations, no host synchronisation. The caller
        keeps ``packed`` alive until the copy has finished, orders later reads of the slot after it,
        and issues every ``write_packed`` of this pool on one stream (they share the staging buffer).
        """
        self._check_slot(slot)
        if packed.layout != self._signature or packed.buffer.numel() != self.packed_nbytes:
            raise ValueError(f"adapter {packed.name!r} was packed for a pool of another layout")
        src = packed.buffer
        if self._staging is not None:
            self._staging.copy_(src, non_blocking=non_blocking)
            src = self._staging
        self._write_from(src, slot)

    def _write_from(self, src: torch.Tensor, slot: int) -> None:
        weights, ranks, scales = self.views(src)
        slot_scatter(weights, self._plans[slot])
        self._ranks[:, :, slot].copy_(ranks)
        self._scales[:, :, slot].copy_(scales)

    def write_slot(self, slot: int, weights: AdapterWeights, *, non_blocking: bool = False) -> None:
        """Copy ``weights`` into ``slot`` (zero-padding to ``r_max``) projection by projection.

        The simple reference path (several small operations per projection, scalar table writes);
        the adapter cache uploads through ``pack`` + ``write_packed``, which writes the same values.
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
        self._ranks[:, :, slot] = 0
        self._scales[:, :, slot] = 0.0

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot!r} outside [0, {self.n_slots})")
