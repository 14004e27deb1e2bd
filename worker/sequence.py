"""The engine's mutable record of one request while it is queued, running or being finished."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lorafleet.worker.types import FinishReason, Request, SequenceState, TopLogprobs

_DETOKENIZE_CONTEXT = 6


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: the scheduler finds sequences in its lists
class Sequence:
    request: Request
    arrival_index: int  # engine-wide admission order: FCFS, and "newest" for preemption
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] | None = None
    output_top_logprobs: list[TopLogprobs] | None = None
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in this sequence's blocks
    block_table: list[int] = field(default_factory=list)
    lora_slot: int = -1  # GPU slot while running; -1 = base model (or not placed)
    holds_adapter_pin: bool = False
    finish_reason: FinishReason | None = None
    # Incremental detokenisation: text = everything decoded so far; delivered_len = what the caller
    # has been sent (the tail is held back while it could still start a stop string).
    text: str = ""
    delivered_len: int = 0
    prefix_offset: int = 0  # into all_token_ids: decode window start (context for the new tokens)
    read_offset: int = 0  # into all_token_ids: tokens before this are already in ``text``
    # Output produced since the caller last collected it (one engine step).
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)
    pending_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # Overlapped stepping: tokens sampled on the device whose values the host has not read yet (at
    # most one between steps), and the newest one's row among its step's sampled rows, from which
    # the next step's forward takes it as input on the device.
    num_inflight: int = 0
    inflight_row: int = -1

    def __post_init__(self) -> None:
        if self.request.sampling.logprobs and self.output_logprobs is None:
            self.output_logprobs = []
        if self.request.sampling.top_logprobs and self.output_top_logprobs is None:
            self.output_top_logprobs = []
        n = len(self.request.prompt_token_ids)
        if self.read_offset == 0:
            self.read_offset = n
            # A few prompt tokens of context make the first decoded token come out with the spacing
            # it has in the whole text (byte-level and SentencePiece decoders depend on neighbours).
            self.prefix_offset = max(0, n - _DETOKENIZE_CONTEXT)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def adapter(self) -> str | None:
        return self.request.adapter

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def num_total_tokens(self) -> int:
        """Tokens including those still in flight: what the KV cache must eventually hold."""
        return self.num_tokens + self.num_inflight

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_total_tokens - self.num_computed_tokens

    def is_length_capped(self, max_model_len: int) -> bool:
        """Its tokens in flight already reach a length limit: it ends once they land, so stepping it
        again would compute a token that is thrown away."""
        return bool(self.num_inflight) and (
            len(self.output_token_ids) + self.num_inflight >= self.request.sampling.max_new_tokens
            or self.num_total_tokens >= max_model_len
        )

    def token_at(self, index: int) -> int:
        n = self.num_prompt_tokens
        return self.request.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_slice(self, start: int, stop: int) -> list[int]:
        n = self.num_prompt_tokens
        prompt = self.request.prompt_token_ids
        if stop <= n:
            return list(prompt[start:stop])
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return list(prompt[start:]) + self.output_token_ids[: stop - n]

    def reset_for_recompute(self) -> None:
        """Forget the KV cache (after preemption); the tokens themselves are kept."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.lora_slot = -1
        self.status = SeqStatus.WAITING

    def add_top_logprobs(self, top: TopLogprobs | None) -> None:
        """Record the alternatives of the token just appended (kept only if the request asked)."""
        if self.output_top_logprobs is not None:
            entry = top if top is not None else ()
            self.output_top_logprobs.append(entry)
            self.pending_top_logprobs.append(entry)

    def take_pending_top_logprobs(self) -> list[TopLogprobs] | None:
        if self.output_top_logprobs is None:
            return None
        tops, self.pending_top_logprobs = self.pending_top_logprobs, []
        return tops

    def take_pending(self) -> tuple[list[int], list[float] | None]:
        tokens, self.pending_token_ids = self.pending_token_ids, []
        logprobs: list[float] | None = None
        if self.output_logprobs is not None:
            logprobs, self.pending_logprobs = self.pending_logprobs, []
        return tokens, logprobs

    def to_state(self) -> SequenceState:
        """The resumable state; text still held back is not counted as delivered."""
        return SequenceState(
            request=self.request,
            output_token_ids=tuple(self.output_token_ids),
            output_logprobs=tuple(self.output_logprobs) if self.output_logprobs is not None else None,
            output_text=self.text[: self.delivered_len],
            output_top_logprobs=(
                tuple(self.output_top_logprobs) if self.output_top_logprobs is not None else None
            ),
        )
