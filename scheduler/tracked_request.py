"""The head's record of one admitted request: what the caller has been given, and where it runs.

This is the state that makes migration and fault recovery lossless: the delivered tokens (and text
and logprobs) are exactly what the caller has seen, so a sequence resumed from them elsewhere
continues with no token lost or repeated.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from lorafleet.worker.types import FinishReason, Request, SequenceState, TokenDelta, TopLogprobs


@dataclass(frozen=True)
class Failure:
    """Put on a request's stream when it cannot complete; `kind` picks the error class raised."""

    reason: str
    kind: str = "error"  # "error" | "invalid" | "unknown_adapter" | "unavailable" (cluster lost)


@dataclass
class TrackedRequest:
    request: Request
    stream: asyncio.Queue = field(default_factory=asyncio.Queue)  # (TokenDelta, produced_at) | Failure
    owner: str | None = None  # worker running it; None while queued
    placed_at: float = 0.0
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    migrating: bool = False  # an export from its owner is in flight
    abort_requested: bool = False
    finished: bool = False
    resumes: int = 0  # times resumed after its worker died
    admitted_at: float = field(default_factory=time.monotonic)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.tokens)

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.request.sampling.max_new_tokens - len(self.tokens))

    def deliver(self, delta: TokenDelta, produced_at: float) -> None:
        """Record a delta as given to the caller and put it on the caller's stream."""
        self.tokens.extend(delta.new_token_ids)
        if delta.new_text:
            self.text.append(delta.new_text)
        if delta.new_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.new_logprobs)
        if delta.new_top_logprobs is not None:
            if self.top_logprobs is None:
                self.top_logprobs = []
            self.top_logprobs.extend(delta.new_top_logprobs)
        if delta.finish_reason is not None:
            self.finished = True
        self.stream.put_nowait((delta, produced_at))

    def fail(self, reason: str, kind: str = "error") -> None:
        self.finished = True
        self.stream.put_nowait(Failure(reason, kind))

    def finish_aborted(self) -> None:
        self.deliver(
            TokenDelta(
                self.request_id,
                (),
                finish_reason=FinishReason.ABORT,
                num_prompt_tokens=len(self.request.prompt_token_ids),
            ),
            time.time(),
        )

    def resume_state(self) -> SequenceState:
        """Everything needed to continue from the last delivered token on another worker."""
        return SequenceState(
            request=self.request,
            output_token_ids=tuple(self.tokens),
            output_logprobs=tuple(self.logprobs) if self.logprobs is not None else None,
            output_text="".join(self.text),
            output_top_logprobs=tuple(self.top_logprobs) if self.top_logprobs is not None else None,
        )

    def catch_up(self, state: SequenceState) -> TokenDelta | None:
        """Tokens the exporting worker produced that have not reached the caller yet.

        An export can overtake the last stream report of the source; its state then holds tokens
        the caller has not seen. They are delivered from the state, and the late report is ignored
        because the request no longer belongs to that worker.
        """
        have = len(self.tokens)
        if tuple(state.output_token_ids[:have]) != tuple(self.tokens):
            raise RuntimeError(f"request {self.request_id}: exported tokens disagree with delivered ones")
        if len(state.output_token_ids) == have:
            return None
        text = "".join(self.text)
        lps = state.output_logprobs[have:] if state.output_logprobs is not None else None
        tops = state.output_top_logprobs[have:] if state.output_top_logprobs is not None else None
        return TokenDelta(
            self.request_id,
            tuple(state.output_token_ids[have:]),
            state.output_text[len(text) :] if state.output_text.startswith(text) else "",
            tuple(lps) if lps is not None else None,
            num_prompt_tokens=len(self.request.prompt_token_ids),
            new_top_logprobs=tuple(tops) if tops is not None else None,
        )
