"""Turn one step's logits into tokens: greedy, temperature, top-k, top-p, seeded or not.

Randomness is a single uniform number per draw, taken on the CPU and applied by inverse-CDF over the
filtered distribution, so a draw does not depend on the device. A seeded request takes draw ``i``
(its i-th generated token) from a generator seeded by ``(seed, i)``: its stream continues exactly
after export/import or preemption. Unseeded requests share the engine's generator.

Host traffic per step is one host-to-device copy (every sampled row's parameters and uniform,
packed by ``Sampler.pack`` into one float64 tensor, pinned when the logits are on CUDA) and one
device-to-host copy (the tokens, and the logprobs and top alternatives if any request wants them,
packed into one float64 tensor), followed by one ``tolist``. ``launch`` queues all of it and returns
at once, so the engine can prepare its next step while the device works; ``result`` waits for the
copy. An all-greedy step without logprobs copies nothing in and runs argmax only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.worker.types import SamplingParams, TopLogprobs

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


# Rows of the parameter tensor built by ``Sampler.pack``: float64 [PARAM_ROWS, M], one column per
# sampled (non-greedy) row. float64 holds every field exactly (row indices and top_k as integers
# below 2**53, the others are Python floats), and each is rounded on the device exactly as a
# ``torch.tensor(list, dtype=float32)`` of the same Python values would be.
ROW_INDEX, TEMPERATURE, TOP_K, TOP_P, UNIFORM = range(5)
PARAM_ROWS = 5
# Any top_k >= vocab keeps every token; the cap keeps huge values exact in float64 and in int64.
_TOP_K_CAP = 1 << 31


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
        return self.launch(logits, params, draw_indices).result()

    def launch(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        draw_indices: Sequence[int],
    ) -> SampledTokens:
        """``sample`` without waiting: the draws are queued on the device, and their copy to the host
        with them; ``result()`` waits for that copy. The host can prepare the next step meanwhile."""
        n = logits.shape[0]
        if len(params) != n or len(draw_indices) != n:
            raise ValueError(f"{n} logit rows but {len(params)} params / {len(draw_indices)} draw indices")
        if n == 0:
            return SampledTokens(torch.empty(0, dtype=torch.int64), None, False)
        logits = logits.float()
        tokens = self.sample_tensors(logits, self.pack(params, draw_indices, logits.device))
        if not any(p.logprobs for p in params):
            return SampledTokens(tokens, _start_to_host(tokens), False)
        # One k for the whole step (the largest asked for); each row keeps its own request's share.
        k = min(max(p.top_logprobs for p in params), logits.shape[1])
        packed = torch.empty((2 + 2 * k, n), dtype=torch.float64, device=logits.device)
        packed[0] = tokens  # exact: token ids are far below 2**53
        logprobs = torch.log_softmax(logits, dim=-1)
        packed[1] = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        if k:
            values, ids = logprobs.topk(k, dim=-1)
            packed[2 : 2 + k] = ids.T
            packed[2 + k :] = values.T
        tops = [p.top_logprobs for p in params] if k else None
        return SampledTokens(tokens, _start_to_host(packed), True, tops)

    def pack(
        self, params: Sequence[SamplingParams], draw_indices: Sequence[int], device: torch.device | str
    ) -> torch.Tensor | None:
        """The parameters and this step's uniform of every non-greedy row, on ``device``.

        Returns float64 [PARAM_ROWS, M] (rows ROW_INDEX, TEMPERATURE, TOP_K (0 = off), TOP_P,
        UNIFORM; column j is the j-th non-greedy row in batch order), or None when every row is
        greedy. Draws the uniforms, so call it once per step, in step order: seeded rows take
        ``seeded_uniform(seed, draw_indices[i])``, the others the engine generator's next numbers in
        row order. One host-to-device copy, non-blocking from pinned memory on CUDA (the caching
        host allocator keeps the pinned block until the copy has run).
        """
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return None
        device = torch.device(device)
        chosen = [params[i] for i in rows]
        seeded = [
            seeded_uniform(p.seed, draw_indices[i]) if p.seed is not None else None
            for p, i in zip(chosen, rows)
        ]
        host = torch.tensor(
            [
                rows,
                [p.temperature for p in chosen],
                [min(p.top_k, _TOP_K_CAP) for p in chosen],
                [p.top_p for p in chosen],
                [u if u is not None else 0.0 for u in seeded],
            ],
            dtype=torch.float64,
            pin_memory=device.type == "cuda",
        )
        unseeded = [j for j, u in enumerate(seeded) if u is None]
        # One call for all unseeded rows, in row order, as before: the generator's stream is unchanged.
        shared = torch.rand(len(unseeded), generator=self._generator, dtype=torch.float64)
        if unseeded:
            host[UNIFORM, unseeded] = shared
        return host.to(device, non_blocking=True)

    @staticmethod
    def sample_tensors(logits: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
        """Tokens int64 [N] on the logits' device, without host lists or host syncs.

        logits: [N, vocab] float32; packed: ``pack``'s tensor for the same rows (or None when all
        are greedy). Greedy rows take the argmax; the others are drawn as ``sample`` draws them.
        Usable inside the engine (e.g. before a later single read-back); logprobs, if wanted,
        come from ``chosen_logprobs(logits, tokens)``.
        """
        if logits.dim() != 2 or logits.dtype != torch.float32:
            raise ValueError(f"logits: expected float32 [N, vocab], got {logits.dtype} {tuple(logits.shape)}")
        tokens = logits.argmax(dim=-1)
        if packed is None:
            return tokens
        if (
            packed.dtype != torch.float64
            or packed.dim() != 2
            or packed.shape[0] != PARAM_ROWS
            or packed.shape[1] > logits.shape[0]
            or packed.device != logits.device
        ):
            raise ValueError(
                f"packed: expected float64 [{PARAM_ROWS}, M <= {logits.shape[0]}] on {logits.device}, "
                f"got {packed.dtype} {tuple(packed.shape)} on {packed.device}"
            )
        if packed.shape[1] == 0:
            return tokens
        index = packed[ROW_INDEX].to(torch.int64)
        picked = _sample_rows(logits.index_select(0, index), packed)
        tokens.index_copy_(0, index, picked)
        return tokens


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[i, tokens[i]]: float32 [N], the unmodified distribution's logprobs."""
    return torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)


def _sample_rows(logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[1]
    temps = packed[TEMPERATURE].to(torch.float32)
    # A stable sort keeps ties in token-id order, so the CDF is the same on every device. Sorting
    # only a top_k-sized candidate set (torch.topk) was considered and rejected: topk does not
    # define which of several tied values it keeps, and CUDA's radix sort orders -0.0/+0.0 and
    # NaNs by their bits, so a partial selection could not be proven equal to this sort.
    vals, order = torch.sort(logits / temps.unsqueeze(1), dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    top_k = packed[TOP_K].to(torch.int64)
    top_k = torch.where(top_k > 0, top_k, vocab)
    vals = vals.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    top_p = packed[TOP_P].to(torch.float32)
    probs = torch.softmax(vals, dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
    outside = (torch.cumsum(probs, dim=-1) - probs) > top_p.unsqueeze(1)
    outside[:, 0] = False
    probs = probs.masked_fill(outside, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    u = packed[UNIFORM].to(torch.float32).unsqueeze(1) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
    # Never land on a zero-probability token (u rounding up to the total).
    choice = torch.minimum(choice, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, choice).squeeze(1)


class SampledTokens:
    """One step's sampled tokens: on the device at once, on the host after ``result()``."""

    def __init__(
        self,
        device_tokens: torch.Tensor,
        pending: tuple[torch.Tensor, torch.cuda.Event | None] | None,
        with_logprobs: bool,
        top_counts: list[int] | None = None,
    ) -> None:
        self.device_tokens = device_tokens  # int64 [N], in sample order
        self._pending = pending
        self._with_logprobs = with_logprobs
        self._top_counts = top_counts  # per row: alternatives its request asked for
        self._tops: list[TopLogprobs | None] | None = None

    def result(self) -> tuple[list[int], list[float] | None]:
        """Tokens (and logprobs when any row asked for them); waits for the copy to the host."""
        if self._pending is None:
            return [], None
        host, event = self._pending
        if event is not None:
            event.synchronize()
        if not self._with_logprobs:
            return host.tolist(), None
        rows = host.tolist()
        tokens, logprobs = rows[0], rows[1]
        if self._top_counts is not None:
            k = (len(rows) - 2) // 2
            ids, values = rows[2 : 2 + k], rows[2 + k :]
            self._tops = [
                tuple((int(ids[j][i]), values[j][i]) for j in range(count)) if count else None
                for i, count in enumerate(self._top_counts)
            ]
        return [int(t) for t in tokens], logprobs

    def top_logprobs(self) -> list[TopLogprobs | None] | None:
        """After ``result()``: per row, its request's top_logprobs alternatives (best first), or
        None for a row that asked for none; None when no row of the step asked."""
        return self._tops


def _start_to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``t`` into pinned host memory; the event marks the copy's end (CUDA only)."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return host, event
