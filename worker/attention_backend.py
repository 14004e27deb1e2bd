"""The attention step of a decoder layer, on one of two backends.

Both take the fused q|k|v projection output of a layer and return the attention output
``[T, Hq * D]``: rotate q and k, store the new K/V in the paged cache at ``batch.slot_mapping``,
attend over each row's cached context.

- ``TorchAttention`` (the CPU path and the reference): worker/rope.py, then worker/attention.py,
  which gathers each context into a padded grid for SDPA; exact against transformers in float32.
- ``TritonAttention`` (CUDA): one fused RoPE + cache-write launch, then paged kernels that read the
  cache in place (kernels/paged_attention.py); a decode-only step needs nothing but the batch's
  own tensors, so it runs under CUDA-graph capture.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lorafleet.kernels.fused_ops import rope_and_cache
from lorafleet.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from lorafleet.worker.attention import build_metadata, paged_attention, write_kv
from lorafleet.worker.batch import BatchLayout
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.rope import RotaryEmbedding


class AttentionBackend(Protocol):
    def prepare(self, batch: BatchLayout, block_size: int) -> object:
        """Per-step state shared by every layer (built once per forward)."""
        ...

    def row_seq_lens(self, batch: BatchLayout, state: object) -> torch.Tensor:
        """[T] context length of each row's sequence (dynamic-NTK RoPE needs it)."""
        ...

    def __call__(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: BatchLayout,
        state: object,
    ) -> torch.Tensor: ...


class TorchAttention:
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding) -> None:
        self.config = config
        self.rope = rope
        self.scale = config.head_dim**-0.5

    def prepare(self, batch: BatchLayout, block_size: int) -> object:
        return build_metadata(batch, block_size, self.config.sliding_window)

    def row_seq_lens(self, batch: BatchLayout, state: object) -> torch.Tensor:
        return state.row_seq_lens  # type: ignore[attr-defined]

    def __call__(self, qkv, cos, sin, k_cache, v_cache, batch, state) -> torch.Tensor:
        cfg = self.config
        t = qkv.shape[0]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(t, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_key_value_heads, cfg.head_dim)
        q, k = self.rope(q, k, cos, sin)
        write_kv(k_cache, v_cache, k, v, state.slot_mapping)  # type: ignore[attr-defined]
        return paged_attention(q, k_cache, v_cache, state, self.scale)  # type: ignore[arg-type]


class TritonAttention:
    def __init__(self, config: ModelConfig, kernel_backend: str = "auto") -> None:
        self.config = config
        self.scale = config.head_dim**-0.5
        # "triton" also on CPU tensors (the interpreter, in tests); "auto" = Triton on CUDA.
        self.kernel_backend = kernel_backend

    def prepare(self, batch: BatchLayout, block_size: int) -> object:
        return None

    def row_seq_lens(self, batch: BatchLayout, state: object) -> torch.Tensor:
        if batch.is_decode_only:
            return batch.seq_lens
        starts = batch.query_start_loc
        return torch.repeat_interleave(batch.seq_lens, starts[1:] - starts[:-1], output_size=batch.num_tokens)

    def __call__(self, qkv, cos, sin, k_cache, v_cache, batch, state) -> torch.Tensor:
        cfg = self.config
        t, hq, hkv, d = qkv.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rope_and_cache(
            qkv,
            cos,
            sin,
            k_cache,
            v_cache,
            batch.slot_mapping,
            num_q_heads=hq,
            num_kv_heads=hkv,
            head_dim=d,
            backend=self.kernel_backend,
        )
        q = qkv[:, : hq * d].view(t, hq, d)
        out = torch.empty(t, hq, d, dtype=qkv.dtype, device=qkv.device)
        if batch.is_decode_only:
            paged_decode_attention(
                out,
                q,
                k_cache,
                v_cache,
                batch.block_tables,
                batch.seq_lens,
                scale=self.scale,
                sliding_window=cfg.sliding_window,
                backend=self.kernel_backend,
            )
        else:
            paged_prefill_attention(
                out,
                q,
                k_cache,
                v_cache,
                batch.block_tables,
                batch.seq_lens,
                batch.query_start_loc,
                max_query_len=batch.max_query_len,
                scale=self.scale,
                sliding_window=cfg.sliding_window,
                backend=self.kernel_backend,
            )
        return out.view(t, hq * d)


def make_attention(
    config: ModelConfig, rope: RotaryEmbedding, device: torch.device, backend: str = "auto"
) -> AttentionBackend:
    """``auto``: Triton kernels on CUDA, torch elsewhere; ``triton`` on the CPU needs TRITON_INTERPRET=1."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"attention backend {backend!r} is not one of auto, torch, triton")
    if backend == "triton":
        return TritonAttention(config, "triton")
    if device.type == "cuda":
        return TritonAttention(config)
    return TorchAttention(config, rope)
