"""Build the step's one ``BatchLayout`` from the scheduler's decision.

Sequences are ordered by LoRA slot (stable, so FCFS order holds within an adapter) and each
contributes its rows contiguously, so every adapter is one SGMV segment. All index arithmetic is
done on the host in plain Python (``plan_batch``); ``BatchBuffers`` (batch_buffers.py) then packs
the plan into pinned memory and moves it with one copy, or ``build_batch`` moves it field by field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.worker.batch import BatchLayout
from lorafleet.worker.batching import ScheduledSeq


@dataclass
class BatchPlan:
    """One step's layout as host lists (see ``BatchLayout`` for the meaning of each field)."""

    input_ids: list[int]
    # Per row: -1, or the index among the previous step's sampled rows whose token (still on the
    # device, not yet read back) is this row's input; ``input_ids`` holds 0 there.
    input_src: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_ids: tuple[str, ...]
    query_start: list[int]  # [B+1]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    block_tables: list[list[int]]  # ragged; padded when moved to the device
    seg_indptr: list[int]
    seg_slots: list[int]
    logits_indices: list[int]
    sample_seq_ids: tuple[str, ...]

    @classmethod
    def empty(cls) -> BatchPlan:
        """No rows: padded to a bucket, every row is padding (graph warm-up and capture)."""
        return cls([], [], [], [], (), [0], (), (), [], [0], [], [], ())

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)

    @property
    def max_blocks(self) -> int:
        return max(len(t) for t in self.block_tables)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @property
    def uses_lora(self) -> bool:
        return any(s >= 0 for s in self.seg_slots)

    @property
    def reads_inflight(self) -> bool:
        return any(s >= 0 for s in self.input_src)


def plan_batch(scheduled: list[ScheduledSeq], block_size: int) -> BatchPlan:
    if not scheduled:
        raise ValueError("cannot build a batch with no scheduled sequences")
    items = sorted(scheduled, key=lambda s: s.seq.lora_slot)
    input_ids: list[int] = []
    input_src: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_start = [0]
    query_lens: list[int] = []
    context_lens: list[int] = []
    tables: list[list[int]] = []
    logits_indices: list[int] = []
    sample_ids: list[str] = []
    seg_indptr = [0]
    seg_slots: list[int] = []
    for item in items:
        seq, n = item.seq, item.num_tokens
        start = seq.num_computed_tokens
        end = start + n
        if n < 1 or end > seq.num_total_tokens:
            raise ValueError(
                f"{seq.request_id}: cannot schedule {n} tokens from {start} of {seq.num_total_tokens}"
            )
        table = seq.block_table
        if len(table) * block_size < end:
            raise ValueError(f"{seq.request_id}: {len(table)} KV blocks cannot hold {end} tokens")
        known = seq.num_tokens  # tokens the host has; one more may still be in flight
        if n == 1:  # decode: skip the generic range arithmetic, it is most of the host time per row
            if start < known:
                input_ids.append(seq.token_at(start))
                input_src.append(-1)
            else:
                input_ids.append(0)
                input_src.append(seq.inflight_row)
            positions.append(start)
            slot_mapping.append(table[start // block_size] * block_size + start % block_size)
        else:
            host_end = min(end, known)
            input_ids.extend(seq.token_slice(start, host_end))
            input_src.extend([-1] * (host_end - start))
            if end > host_end:  # only the newest token can be in flight
                input_ids.append(0)
                input_src.append(seq.inflight_row)
            positions.extend(range(start, end))
            slot_mapping.extend(
                table[p // block_size] * block_size + p % block_size for p in range(start, end)
            )
        query_lens.append(n)
        context_lens.append(end)
        tables.append(table)
        query_start.append(query_start[-1] + n)
        if end == seq.num_total_tokens:  # the prompt (or recompute) is complete: sample the next token
            logits_indices.append(query_start[-1] - 1)
            sample_ids.append(seq.request_id)
        if seg_slots and seg_slots[-1] == seq.lora_slot:
            seg_indptr[-1] = query_start[-1]
        else:
            seg_slots.append(seq.lora_slot)
            seg_indptr.append(query_start[-1])
    return BatchPlan(
        input_ids=input_ids,
        input_src=input_src,
        positions=positions,
        slot_mapping=slot_mapping,
        seq_ids=tuple(s.seq.request_id for s in items),
        query_start=query_start,
        query_lens=tuple(query_lens),
        context_lens=tuple(context_lens),
        block_tables=tables,
        seg_indptr=seg_indptr,
        seg_slots=seg_slots,
        logits_indices=logits_indices,
        sample_seq_ids=tuple(sample_ids),
    )


def build_batch(scheduled: list[ScheduledSeq], block_size: int, device: torch.device | str) -> BatchLayout:
    """The plan moved to ``device`` one tensor per field (tests and simple callers; the engine packs)."""
    plan = plan_batch(scheduled, block_size)
    if plan.reads_inflight:
        raise ValueError("build_batch cannot resolve inputs still in flight on the device; use BatchBuffers")
    width = plan.max_blocks
    padded = [t + [-1] * (width - len(t)) for t in plan.block_tables]

    def on_device(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return BatchLayout(
        input_ids=on_device(plan.input_ids, torch.int64),
        positions=on_device(plan.positions, torch.int64),
        seq_ids=plan.seq_ids,
        query_lens=plan.query_lens,
        context_lens=plan.context_lens,
        query_start_loc=on_device(plan.query_start, torch.int32),
        seq_lens=on_device(list(plan.context_lens), torch.int32),
        block_tables=on_device(padded, torch.int32),
        slot_mapping=on_device(plan.slot_mapping, torch.int64),
        max_query_len=plan.max_query_len,
        max_context_len=plan.max_context_len,
        lora_seg_indptr=on_device(plan.seg_indptr, torch.int32),
        lora_seg_slots=on_device(plan.seg_slots, torch.int32),
        logits_indices=on_device(plan.logits_indices, torch.int64),
        sample_seq_ids=plan.sample_seq_ids,
    )
