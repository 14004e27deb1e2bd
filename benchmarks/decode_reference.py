"""The plain-PyTorch decode step the engine is measured against (issue 10's reference).

What a careful PyTorch user would write for one decode step of a fixed batch: a static
``[B, Hkv, context, D]`` KV cache per layer, cuBLAS projections, torch RMSNorm / RoPE / SiLU, SDPA
over the whole context, greedy argmax, all captured in one CUDA graph. No paging, no scheduling,
no sampling options; with ``lora`` it adds this project's ``add_lora_slices`` to the four projection
groups, each row its own segment. It reuses the engine model's weights, so it costs only its cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.kernels import add_lora_slices
from lorafleet.worker.lora_pool import LoraSlotPool
from lorafleet.worker.model import LlamaModel

_GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class ReferenceDecode:
    def __init__(
        self,
        model: LlamaModel,
        batch: int,
        context: int,
        pool: LoraSlotPool | None = None,
        slots: list[int] | None = None,
    ) -> None:
        cfg = model.config
        self.model, self.cfg, self.pool = model, cfg, pool
        dev, dt = model.device, model.dtype
        shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
        self.k = [torch.randn(shape, dtype=dt, device=dev) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.randn(shape, dtype=dt, device=dev) for _ in range(cfg.num_hidden_layers)]
        self.ids = torch.randint(3, cfg.vocab_size, (batch,), device=dev)
        self.pos = context - 1
        cos, sin = model.rope.cos_sin(torch.full((batch,), self.pos, device=dev), dt)
        self.cos, self.sin = cos[:, None, :], sin[:, None, :]
        if pool is not None:
            assert slots is not None and len(slots) == batch
            self.indptr = torch.arange(batch + 1, dtype=torch.int32, device=dev)
            self.slots = torch.tensor(slots, dtype=torch.int32, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None

    def _lora(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        if self.pool is None:
            return
        projs = [self.pool.get(layer, p) for p in _GROUPS[group]]
        ranks, scales = self.pool.rank_scale_tables(layer, list(_GROUPS[group]))
        add_lora_slices(
            y,
            x,
            [p.a for p in projs],  # type: ignore[union-attr]
            [p.b for p in projs],  # type: ignore[union-attr]
            self.indptr,
            self.slots,
            ranks=ranks,
            scales=scales,
        )

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        cfg, m = self.cfg, self.model
        b, hq, hkv, d = self.ids.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = F.embedding(self.ids, m.embed_tokens)
        for i, layer in enumerate(m.layers):
            h = _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
            qkv = F.linear(h, layer.qkv_proj.weight)
            self._lora(qkv, h, i, "qkv_proj")
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q = _rotate(q.view(b, hq, d), self.cos, self.sin)
            k = _rotate(k.view(b, hkv, d), self.cos, self.sin)
            self.k[i][:, :, self.pos] = k
            self.v[i][:, :, self.pos] = v.view(b, hkv, d)
            attn = F.scaled_dot_product_attention(
                q[:, :, None], self.k[i], self.v[i], enable_gqa=hq != hkv
            ).reshape(b, hq * d)
            o = F.linear(attn, layer.o_proj.weight)
            self._lora(o, attn, i, "o_proj")
            x = x + o
            h = _rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
            gu = F.linear(h, layer.gate_up_proj.weight)
            self._lora(gu, h, i, "gate_up_proj")
            half = gu.shape[-1] // 2
            act = F.silu(gu[:, :half]) * gu[:, half:]
            down = F.linear(act, layer.down_proj.weight)
            self._lora(down, act, i, "down_proj")
            x = x + down
        logits = F.linear(_rms(x, m.norm.weight, cfg.rms_norm_eps), m.lm_head).float()
        return logits.argmax(-1)

    def capture(self) -> None:
        for _ in range(2):  # compile and warm up outside the capture
            self.step()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.tokens = self.step()

    def time_ms(self, reps: int = 20) -> float:
        """Median replay time, each replay bracketed by CUDA events."""
        assert self.graph is not None
        for _ in range(3):
            self.graph.replay()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2]
