"""One HTTP choice's logprobs as the OpenAI shapes want them: the chosen tokens as text, their
logprobs, and with top_logprobs each step's most likely tokens (chat: `logprobs: true,
top_logprobs: N`; completions: `logprobs: N`). Kept per stream chunk and for the whole choice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorafleet.serving import openai_types as oai
from lorafleet.worker.types import TokenDelta

# Token ids -> their text, one string per id (the HTTP API's spelling, e.g. "token_id:7").
TokenStrings = Callable[[tuple[int, ...]], list[str]]


class ChoiceLogprobs:
    """Tokens, logprobs and, when `alternatives` were asked for, one list of them per token."""

    def __init__(self, alternatives: bool) -> None:
        self.tokens: list[str] = []
        self.values: list[float] = []
        self.tops: list[list[tuple[str, float]]] | None = [] if alternatives else None

    def add(self, strings: TokenStrings, delta: TokenDelta) -> None:
        self.tokens += strings(delta.new_token_ids)
        self.values += delta.new_logprobs or ()
        if self.tops is None:
            return
        tops = delta.new_top_logprobs or ()
        for top in tops:
            self.tops.append(list(zip(strings(tuple(t for t, _ in top)), (lp for _, lp in top))))
        # Keep one entry per token, so that no token's logprob is dropped with a missing list.
        self.tops += [[] for _ in range(len(delta.new_token_ids) - len(tops))]

    def extend(self, other: ChoiceLogprobs) -> None:
        self.tokens += other.tokens
        self.values += other.values
        if self.tops is not None and other.tops is not None:
            self.tops += other.tops

    def shape(self, chat: bool, offset: int) -> dict[str, Any]:
        """The chat or completions logprobs object; `offset`: the first token's text_offset."""
        if chat:
            return oai.chat_logprobs(self.tokens, self.values, self.tops)
        return oai.completion_logprobs(self.tokens, self.values, offset, self.tops)
