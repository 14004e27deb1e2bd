"""Build the step's one ``BatchLayout`` from the scheduler's decision.

Sequences are ordered by LoRA slot (stable, so FCFS order holds within an adapter) and each
contributes its rows contiguously, so every adapter is one SGMV segment. All index arithmetic is
done on the host in plain Python, then moved to the device in one transfer per tensor.
"""

from __future__ import annotations

import torch

from lorafleet.worker.batch import BatchLayout
from lorafleet.worker.batching import ScheduledSeq


def build_batch(scheduled: list[ScheduledSeq], block_size: int, device: torch.device | str) -> BatchLayout:
    if not scheduled:
        raise ValueError("cannot build a batch with no scheduled sequences")
    items = sorted(scheduled, key=lambda s: s.seq.lora_slot)
    input_ids: list[int] = []
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
        if n < 1 or end > seq.num_tokens:
            raise ValueError(f"{seq.request_id}: cannot schedule {n} tokens from {start} of {seq.num_tokens}")
        if len(seq.block_table) * block_size < end:
            raise ValueError(f"{seq.request_id}: {len(seq.block_table)} KV blocks cannot hold {end} tokens")
        input_ids.extend(seq.token_slice(start, end))
        positions.extend(range(start, end))
        table = seq.block_table
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        query_lens.append(n)
        context_lens.append(end)
        tables.append(table)
        query_start.append(query_start[-1] + n)
        if end == seq.num_tokens:  # the prompt (or recompute) is complete: sample the next token
            logits_indices.append(query_start[-1] - 1)
            sample_ids.append(seq.request_id)
        if seg_slots and seg_slots[-1] == seq.lora_slot:
            seg_indptr[-1] = query_start[-1]
        else:
            seg_slots.append(seq.lora_slot)
            seg_indptr.append(query_start[-1])
    width = max(len(t) for t in tables)
    padded = [t + [-1] * (width - len(t)) for t in tables]

    def on_device(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return BatchLayout(
        input_ids=on_device(input_ids, torch.int64),
        positions=on_device(positions, torch.int64),
        seq_ids=tuple(s.seq.request_id for s in items),
        query_lens=tuple(query_lens),
        context_lens=tuple(context_lens),
        query_start_loc=on_device(query_start, torch.int32),
        seq_lens=on_device(context_lens, torch.int32),
        block_tables=on_device(padded, torch.int32),
        slot_mapping=on_device(slot_mapping, torch.int64),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        lora_seg_indptr=on_device(seg_indptr, torch.int32),
        lora_seg_slots=on_device(seg_slots, torch.int32),
        logits_indices=on_device(logits_indices, torch.int64),
        sample_seq_ids=tuple(sample_ids),
    )
