"""Rotary position embeddings with the scaling rules of real Llama-family configs.

The frequencies are computed exactly as transformers computes them (float32 inverse frequencies,
cos/sin cast to the activation dtype) so logits match the reference to float32 round-off.
"""

from __future__ import annotations

import math

import torch

from lorafleet.worker.model_config import ModelConfig


def base_inv_freq(theta: float, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Unscaled inverse frequencies ``theta ** (-2i/dim)``, float32 [dim/2]."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (theta**exponents)


def scaled_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The inverse frequencies used at positions within the model's native context."""
    inv_freq = base_inv_freq(config.rope_theta, config.head_dim, device)
    rs = config.rope_scaling
    if rs is None or rs.rope_type in ("default", "dynamic"):
        # Dynamic NTK only departs from the default past max_position_embeddings (per sequence).
        return inv_freq
    if rs.rope_type == "linear":
        return inv_freq / rs.factor
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    old_len = rs.original_max_position_embeddings
    low_freq_wavelen = old_len / rs.low_freq_factor
    high_freq_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin per token row and rotates q and k in place of the reference's RoPE module."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.dim = config.head_dim
        self.register_buffer("inv_freq", scaled_inv_freq(config, device), persistent=False)
        rs = config.rope_scaling
        self.dynamic_factor = rs.factor if rs is not None and rs.rope_type == "dynamic" else None

    def cos_sin(
        self,
        positions: torch.Tensor,
        dtype: torch.dtype,
        row_seq_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in ``dtype`` for ``positions`` [T].

        ``row_seq_lens`` [T] (the context length of each row's sequence) is used by dynamic NTK
        scaling only: a sequence longer than max_position_embeddings gets the NTK-stretched base
        for its length, as transformers does for a single sequence.
        """
        inv = self.inv_freq.to(positions.device)
        pos = positions.to(torch.float32)
        if self.dynamic_factor is not None and row_seq_lens is not None:
            freqs = pos[:, None] * self._dynamic_inv_freq(row_seq_lens.to(positions.device), inv)
        else:
            freqs = pos[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _dynamic_inv_freq(self, row_seq_lens: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        factor = self.dynamic_factor
        assert factor is not None
        max_pos = self.config.max_position_embeddings
        dim = self.dim
        seq_len = torch.clamp(row_seq_lens.to(torch.float64), min=max_pos)
        base = self.config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=inv.device).to(torch.float32) / dim
        stretched = 1.0 / (base.to(torch.float32)[:, None] ** exponents[None, :])
        # Within the native context the reference keeps the original frequencies bit for bit.
        native = (row_seq_lens <= max_pos)[:, None]
        return torch.where(native, inv[None, :], stretched)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] with cos/sin [T, D]."""
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
