"""The one batch-layout object built per engine step and passed explicitly to the model.

Layout rules (the kernels rely on them):
- Token rows are grouped by sequence (each sequence's new tokens contiguous, in position order) and
  sequences are sorted by adapter slot, so the rows of one adapter form one contiguous SGMV segment.
- Prefill chunks and decode tokens share the batch: a sequence contributes ``query_len >= 1`` rows.
- Everything the GPU needs is a device tensor built once here; nothing is read back to the host
  during the forward pass, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchLayout:
    # --- tokens, [T] ---
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each row in its sequence
    # --- sequences, [B] (in row order) ---
    seq_ids: tuple[str, ...]  # request id of each sequence (host)
    query_lens: tuple[int, ...]  # rows each sequence contributes this step (host)
    context_lens: tuple[int, ...]  # tokens in the KV cache after this step, per sequence (host)
    query_start_loc: torch.Tensor  # [B+1] int32, row offsets of each sequence's rows
    seq_lens: torch.Tensor  # [B] int32, == context_lens on the device
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, physical block ids (-1 pad)
    slot_mapping: torch.Tensor  # [T] int64, KV-cache slot (block * block_size + offset) per row
    max_query_len: int  # host copies of the maxima so kernels need no sync
    max_context_len: int
    # --- LoRA segments (rows sorted by adapter) ---
    lora_seg_indptr: torch.Tensor  # [S+1] int32, row offsets of adapter segments
    lora_seg_slots: torch.Tensor  # [S] int32, GPU slot of each segment's adapter, -1 = base model
    # --- sampling ---
    logits_indices: torch.Tensor  # [N] int64, rows whose logits are sampled (last row of a sequence
    #                               that finishes its prompt or decodes this step)
    sample_seq_ids: tuple[str, ...]  # request id for each entry of logits_indices (host)
    # --- overlapped stepping ---
    input_src: torch.Tensor | None = None  # [T] int32: -1, or the previous step's sampled row whose
    #                                        token (on the device) replaces input_ids at that row

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
