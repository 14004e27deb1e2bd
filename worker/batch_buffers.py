"""Persistent step metadata: packed in pinned host memory, moved to the device in one copy.

Every field of a ``BatchLayout`` is a run of int32 in one buffer, so a step costs one host-to-device
copy instead of one per field, and the device buffer never moves: a CUDA graph captured over views
of it sees each step's new values. Where each field starts depends only on the padded sizes (rows,
sequences, segments, sampled rows, block-table width), so a decode step padded to a graph's batch
bucket lands exactly where that graph reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorafleet.worker.batch import BatchLayout
from lorafleet.worker.batch_builder import BatchPlan

_FIELDS = (
    "input_ids",
    "input_src",
    "positions",
    "slot_mapping",
    "query_start_loc",
    "seq_lens",
    "lora_seg_indptr",
    "lora_seg_slots",
    "logits_indices",
    "block_tables",
)


@dataclass(frozen=True)
class PackedShape:
    """Padded sizes of one step's metadata; equal shapes give equal offsets."""

    rows: int
    seqs: int
    segs: int
    logits: int
    width: int

    def offsets(self) -> dict[str, tuple[int, int]]:
        sizes = (
            self.rows,
            self.rows,
            self.rows,
            self.rows,
            self.seqs + 1,
            self.seqs,
            self.segs + 1,
            self.segs,
            self.logits,
            self.seqs * self.width,
        )
        out, acc = {}, 0
        for name, size in zip(_FIELDS, sizes):
            out[name] = (acc, acc + size)
            acc += size
        return out

    @property
    def numel(self) -> int:
        return 4 * self.rows + 2 * self.seqs + 2 * self.segs + 2 + self.logits + self.seqs * self.width


def decode_shape(batch_size: int, width: int) -> PackedShape:
    """The padded shape of a decode step run as a CUDA graph of ``batch_size`` rows.

    One segment per row at most, plus one (slot -1) that holds the padding rows.
    """
    return PackedShape(batch_size, batch_size, batch_size + 1, batch_size, width)


def mixed_shape(rows: int, capacity: PackedShape) -> PackedShape:
    """The padded shape of a step with prefill rows run as a CUDA graph of ``rows`` token rows.

    Sequences, segments and sampled rows are padded to the buffers' capacity, so one graph per row
    bucket holds any mix of prefill chunks and decodes that fits it.
    """
    return PackedShape(rows, capacity.seqs, capacity.segs, capacity.logits, capacity.width)


class BatchBuffers:
    def __init__(self, capacity: PackedShape, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device
        pin = device.type == "cuda"
        # Two staging buffers: the host fills one while the copy out of the other may be in flight.
        self._staging = [torch.empty(capacity.numel, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self.device_buffer = torch.zeros(capacity.numel, dtype=torch.int32, device=device)

    def shape_of(
        self, plan: BatchPlan, pad_to: int | None, width: int | None, pad_rows: int | None = None
    ) -> PackedShape:
        if pad_rows is not None:
            cap = self.capacity
            if plan.num_tokens > pad_rows or len(plan.logits_indices) > cap.logits:
                raise ValueError(f"a step of {plan.num_tokens} rows does not pad to {pad_rows} rows")
            return mixed_shape(pad_rows, cap)
        if pad_to is not None:
            if plan.num_seqs and (not plan.is_decode_only or plan.num_seqs > pad_to):
                raise ValueError(f"only a decode batch of at most {pad_to} sequences pads to {pad_to}")
            return decode_shape(pad_to, width or plan.max_blocks)
        return PackedShape(
            plan.num_tokens,
            plan.num_seqs,
            len(plan.seg_slots),
            len(plan.logits_indices),
            width or plan.max_blocks,
        )

    def upload(
        self,
        plan: BatchPlan,
        *,
        pad_to: int | None = None,
        width: int | None = None,
        pad_rows: int | None = None,
    ) -> BatchLayout:
        """Pack ``plan`` and move it: padded to ``pad_to`` decode rows and ``width`` block-table
        columns, or (``pad_rows``) to that many token rows and the capacity's sequences, segments and
        sampled rows (``mixed_shape``).

        Padding rows read nothing and write nothing: input 0 (not from the device) at position 0,
        KV slot -1, context length 0, in a final LoRA segment of slot -1.
        """
        shape = self.shape_of(plan, pad_to, width, pad_rows)
        cap = self.capacity
        if (
            shape.rows > cap.rows
            or shape.seqs > cap.seqs
            or shape.segs > cap.segs
            or shape.logits > cap.logits
            or shape.width > cap.width
        ):
            raise ValueError(f"batch shape {shape} exceeds the buffers' capacity {cap}")
        staging = self._staging[self._turn]
        self._turn ^= 1
        host = staging.numpy()
        offs = shape.offsets()
        n, b = plan.num_tokens, plan.num_seqs

        def put(name: str, values: list[int], pad: int) -> None:
            lo, hi = offs[name]
            host[lo : lo + len(values)] = values
            if lo + len(values) < hi:
                host[lo + len(values) : hi] = pad

        put("input_ids", plan.input_ids, 0)
        put("input_src", plan.input_src, -1)
        put("positions", plan.positions, 0)
        put("slot_mapping", plan.slot_mapping, -1)
        lo, hi = offs["query_start_loc"]
        host[lo : lo + b + 1] = plan.query_start
        if pad_rows is None:
            # Padding sequences of a decode graph have one row each, so the offsets keep counting.
            host[lo + b + 1 : hi] = np.arange(n + 1, n + 1 + (hi - lo - b - 1), dtype=np.int32)
        else:
            # Those of a mixed-step graph have none: no kernel touches the padding rows' attention
            # output, and every later operation is row-wise, so what they compute stays in them.
            host[lo + b + 1 : hi] = n
        put("seq_lens", list(plan.context_lens), 0)
        num_segs = len(plan.seg_slots)
        lo, hi = offs["lora_seg_indptr"]
        host[lo : lo + num_segs + 1] = plan.seg_indptr
        host[lo + num_segs + 1 : hi] = shape.rows  # the padding segment, then empty ones
        put("lora_seg_slots", plan.seg_slots, -1)
        if pad_to is not None:  # a graph computes every row's logits
            lo, hi = offs["logits_indices"]
            host[lo:hi] = np.arange(hi - lo, dtype=np.int32)
        else:
            put("logits_indices", plan.logits_indices, 0)
        lo, hi = offs["block_tables"]
        tables = host[lo:hi].reshape(shape.seqs, shape.width)
        tables.fill(-1)
        for i, table in enumerate(plan.block_tables):
            tables[i, : len(table)] = table
        total = shape.numel
        self.device_buffer[:total].copy_(staging[:total], non_blocking=True)
        return self.layout(shape, plan)

    def layout(self, shape: PackedShape, plan: BatchPlan | None = None) -> BatchLayout:
        """Views of the device buffer for ``shape``; host fields from ``plan`` (or placeholders)."""
        views = {name: self.device_buffer[lo:hi] for name, (lo, hi) in shape.offsets().items()}
        views["block_tables"] = views["block_tables"].view(shape.seqs, shape.width)
        if plan is None or plan.num_seqs == 0:
            ids: tuple[str, ...] = tuple(f"pad-{i}" for i in range(shape.seqs))
            qlens, ctx, sample = (1,) * shape.seqs, (1,) * shape.seqs, ids
            max_q, max_ctx = 1, 1
        else:
            ids, qlens, ctx, sample = plan.seq_ids, plan.query_lens, plan.context_lens, plan.sample_seq_ids
            max_q, max_ctx = plan.max_query_len, plan.max_context_len
        return BatchLayout(
            seq_ids=ids,
            query_lens=qlens,
            context_lens=ctx,
            max_query_len=max_q,
            max_context_len=max_ctx,
            sample_seq_ids=sample,
            **views,
        )
