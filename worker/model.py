"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache with multi-LoRA.

One forward call runs one engine step: a ``BatchLayout`` of prefill chunks and decode tokens,
token rows sorted by adapter so each adapter's rows form one SGMV segment. q|k|v and gate|up are
fused; LoRA is added slice by slice to whichever projections the slot pool holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lorafleet.kernels.fused_ops import silu_and_mul
from lorafleet.worker.attention_backend import AttentionBackend, make_attention
from lorafleet.worker.batch import BatchLayout
from lorafleet.worker.kv_cache import KVCache, resolve_device, resolve_dtype
from lorafleet.worker.layers import FusedLinear, RMSNorm
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.rope import RotaryEmbedding

if TYPE_CHECKING:
    from lorafleet.worker.lora_pool import LoraSlotPool


class DecoderLayer(torch.nn.Module):
    def __init__(
        self, config: ModelConfig, index: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.index = index
        self.config = config
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.qkv_proj = FusedLinear(
            h,
            {"q_proj": config.q_size, "k_proj": config.kv_size, "v_proj": config.kv_size},
            config.qkv_bias,
            dtype,
            device,
        )
        self.o_proj = FusedLinear(config.q_size, {"o_proj": h}, config.o_bias, dtype, device)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.gate_up_proj = FusedLinear(h, {"gate_proj": i, "up_proj": i}, config.mlp_bias, dtype, device)
        self.down_proj = FusedLinear(i, {"down_proj": h}, config.mlp_bias, dtype, device)

    def forward(
        self,
        delta: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVCache,
        attention: AttentionBackend,
        attn_state: object,
        lora: LoraSlotPool | None,
        batch: BatchLayout,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer. The stream is kept as ``residual + delta`` so that each residual add is fused
        with the norm after it; the first layer gets the embeddings as ``delta`` and no residual.
        Returns the layer's (delta, residual)."""
        if residual is None:
            residual = delta
            x = self.input_layernorm(delta)
        else:
            x = self.input_layernorm.add_and_norm(delta, residual)
        qkv = self.qkv_proj(x, lora, self.index, batch)
        k_cache, v_cache = kv.layer(self.index)
        attn = attention(qkv, cos, sin, k_cache, v_cache, batch, attn_state)
        x = self.post_attention_layernorm.add_and_norm(self.o_proj(attn, lora, self.index, batch), residual)
        act = silu_and_mul(self.gate_up_proj(x, lora, self.index, batch))
        return self.down_proj(act, lora, self.index, batch), residual


class LlamaModel(torch.nn.Module):
    """Decoder + LM head. Weights are filled by ``loader.load_model`` (or ``load_hf_state``)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        h = config.hidden_size
        self.embed_tokens = torch.nn.Parameter(
            torch.empty(config.vocab_size, h, dtype=self.dtype, device=self.device), requires_grad=False
        )
        self.layers = torch.nn.ModuleList(
            DecoderLayer(config, i, self.dtype, self.device) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(h, config.rms_norm_eps, self.dtype, self.device)
        if config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = torch.nn.Parameter(
                torch.empty(config.vocab_size, h, dtype=self.dtype, device=self.device),
                requires_grad=False,
            )
        self.rope = RotaryEmbedding(config, self.device)
        self.attention: AttentionBackend = make_attention(config, self.rope, self.device)

    def set_attention_backend(self, backend: str) -> None:
        """``torch`` or ``triton`` (``auto``: Triton on CUDA); tests compare the two."""
        self.attention = make_attention(self.config, self.rope, self.device, backend)

    @torch.inference_mode()
    def forward(self, batch: BatchLayout, kv: KVCache, lora: LoraSlotPool | None = None) -> torch.Tensor:
        """Run one step; logits [len(batch.logits_indices), vocab] float32 of the sampled rows."""
        hidden = self._final_hidden(batch, kv, lora)
        return self._logits(hidden[batch.logits_indices])

    @torch.inference_mode()
    def forward_all_logits(
        self, batch: BatchLayout, kv: KVCache, lora: LoraSlotPool | None = None
    ) -> torch.Tensor:
        """Run one step; logits [T, vocab] float32 of every row (tests and scoring)."""
        return self._logits(self._final_hidden(batch, kv, lora))

    def _final_hidden(self, batch: BatchLayout, kv: KVCache, lora: LoraSlotPool | None) -> torch.Tensor:
        self._check(batch, kv, lora)
        state = self.attention.prepare(batch, kv.block_size)
        hidden = F.embedding(batch.input_ids, self.embed_tokens)
        row_seq_lens = self.attention.row_seq_lens(batch, state) if self.rope.dynamic_factor else None
        cos, sin = self.rope.cos_sin(batch.positions, self.dtype, row_seq_lens)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, kv, self.attention, state, lora, batch)
        assert residual is not None
        return self.norm.add_and_norm(hidden, residual)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    def _check(self, batch: BatchLayout, kv: KVCache, lora: LoraSlotPool | None) -> None:
        cfg = self.config
        if kv.config.num_hidden_layers != cfg.num_hidden_layers or (
            kv.config.num_key_value_heads,
            kv.config.head_dim,
        ) != (cfg.num_key_value_heads, cfg.head_dim):
            raise ValueError("kv: the KV cache was built for a different model shape")
        if resolve_device(kv.device) != self.device or batch.input_ids.device != self.device:
            raise ValueError(
                f"batch/kv must be on the model's device {self.device} "
                f"(input_ids on {batch.input_ids.device}, kv on {kv.device})"
            )
        if lora is not None and (lora.num_layers != cfg.num_hidden_layers or lora.dtype != self.dtype):
            raise ValueError(
                f"lora: pool has {lora.num_layers} layers of {lora.dtype}, model "
                f"{cfg.num_hidden_layers} of {self.dtype}"
            )
        if batch.input_ids.dim() != 1 or batch.positions.shape != batch.input_ids.shape:
            raise ValueError("batch: input_ids and positions must be 1-D tensors of the same length")
        if batch.slot_mapping.shape != batch.input_ids.shape:
            raise ValueError("batch: slot_mapping must have one entry per token row")

    # --- weights ---
    def load_hf_state(self, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Fill the parameters from Hugging Face-named tensors (fusing q|k|v and gate|up).

        Missing or misshapen tensors raise ValueError naming the key and ``source``.
        """
        cfg = self.config

        def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            if key not in tensors:
                raise ValueError(f"{source}: missing tensor {key!r}")
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise ValueError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
            return t

        h, i = cfg.hidden_size, cfg.intermediate_size
        qkv_widths = {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size}
        with torch.no_grad():
            self.embed_tokens.copy_(take("model.embed_tokens.weight", (cfg.vocab_size, h)))
            if not cfg.tie_word_embeddings:
                self.lm_head.copy_(take("lm_head.weight", (cfg.vocab_size, h)))
            self.norm.weight.copy_(take("model.norm.weight", (h,)))
            for n, layer in enumerate(self.layers):
                p = f"model.layers.{n}."
                layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight", (h,)))
                layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight", (h,)))
                attn = p + "self_attn."
                layer.qkv_proj.load_slices(
                    [take(f"{attn}{name}.weight", (w, h)) for name, w in qkv_widths.items()],
                    [take(f"{attn}{name}.bias", (w,)) for name, w in qkv_widths.items()]
                    if cfg.qkv_bias
                    else None,
                )
                layer.o_proj.load_slices(
                    [take(attn + "o_proj.weight", (h, cfg.q_size))],
                    [take(attn + "o_proj.bias", (h,))] if cfg.o_bias else None,
                )
                mlp = p + "mlp."
                layer.gate_up_proj.load_slices(
                    [take(mlp + "gate_proj.weight", (i, h)), take(mlp + "up_proj.weight", (i, h))],
                    [take(mlp + "gate_proj.bias", (i,)), take(mlp + "up_proj.bias", (i,))]
                    if cfg.mlp_bias
                    else None,
                )
                layer.down_proj.load_slices(
                    [take(mlp + "down_proj.weight", (h, i))],
                    [take(mlp + "down_proj.bias", (h,))] if cfg.mlp_bias else None,
                )


def expected_hf_keys(config: ModelConfig) -> set[str]:
    """Every tensor name a Hugging Face checkpoint of ``config`` must provide."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        keys.add("lm_head.weight")
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.add(f"{p}self_attn.{proj}.weight")
        if config.qkv_bias:
            keys |= {f"{p}self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")}
        if config.o_bias:
            keys.add(f"{p}self_attn.o_proj.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys.add(f"{p}mlp.{proj}.weight")
            if config.mlp_bias:
                keys.add(f"{p}mlp.{proj}.bias")
    return keys
