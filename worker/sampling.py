"""Turn one step's logits into tokens: greedy, temperature, top-k, top-p, seeded or not.

Randomness is a single uniform number per draw, taken on the CPU and applied by inverse-CDF over the
filtered distribution, so a draw does not depend on the device. A seeded request takes draw ``i``
(its i-th generated token) from a generator seeded by ``(seed, i)``: its stream continues exactly
after export/import or preemption. Unseeded requests share the engine's generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.worker.types import SamplingParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, index: int) -> float:
    """The uniform in [0, 1) of draw ``index`` of a request seeded with ``seed``."""
    key = _splitmix64(_splitmix64(seed) ^ index) & ((1 << 63) - 1)
    gen = torch.Generator().manual_seed(key)
    return float(torch.rand((), generator=gen, dtype=torch.float64))


class Sampler:
    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        draw_indices: Sequence[int],
    ) -> tuple[list[int], list[float] | None]:
        """Pick one token per row of ``logits`` [N, vocab] (float32).

        ``draw_indices[i]`` is how many tokens row i's request has generated so far. Returns the
        tokens and, if any request asked for them, the log-probabilities of the chosen tokens under
        the model's unmodified distribution (before temperature and filtering), else None.
        """
        n = logits.shape[0]
        if len(params) != n or len(draw_indices) != n:
            raise ValueError(f"{n} logit rows but {len(params)} params / {len(draw_indices)} draw indices")
        if n == 0:
            return [], None
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            picked = self._sample_rows(
                logits.index_select(0, index), [params[i] for i in rows], [draw_indices[i] for i in rows]
            )
            tokens.index_copy_(0, index, picked)
        logprobs = None
        if any(p.logprobs for p in params):
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        return tokens.tolist(), (logprobs.tolist() if logprobs is not None else None)

    def _sample_rows(
        self, logits: torch.Tensor, params: list[SamplingParams], draw_indices: list[int]
    ) -> torch.Tensor:
        device = logits.device
        vocab = logits.shape[1]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        # A stable sort keeps ties in token-id order, so the CDF is the same on every device.
        vals, order = torch.sort(logits / temps.unsqueeze(1), dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        vals = vals.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        probs = torch.softmax(vals, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        outside = (torch.cumsum(probs, dim=-1) - probs) > top_p.unsqueeze(1)
        outside[:, 0] = False
        probs = probs.masked_fill(outside, 0.0)
        cdf = torch.cumsum(probs, dim=-1)
        draws = [
            seeded_uniform(p.seed, i) if p.seed is not None else None for p, i in zip(params, draw_indices)
        ]
        unseeded = sum(d is None for d in draws)
        shared = torch.rand(unseeded, generator=self._generator, dtype=torch.float64).tolist()
        uniforms = [d if d is not None else shared.pop(0) for d in draws]
        u = torch.tensor(uniforms, dtype=torch.float32, device=device).unsqueeze(1) * cdf[:, -1:]
        choice = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
        # Never land on a zero-probability token (u rounding up to the total).
        choice = torch.minimum(choice, (probs > 0).sum(dim=-1, keepdim=True) - 1)
        return order.gather(1, choice).squeeze(1)
