"""Append a sampled token to a sequence: incremental detokenisation and every stop condition."""

from __future__ import annotations

from typing import Protocol

from lorafleet.worker.sequence import Sequence
from lorafleet.worker.types import FinishReason, SequenceState

_REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 byte sequence


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class StopChecker:
    def __init__(self, tokenizer: Decoder | None, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def append_token(self, seq: Sequence, token: int, logprob: float | None) -> FinishReason | None:
        """Record ``token`` as ``seq``'s next output; return why the sequence ends, if it does."""
        seq.output_token_ids.append(token)
        seq.pending_token_ids.append(token)
        if seq.output_logprobs is not None:
            lp = float(logprob) if logprob is not None else float("nan")
            seq.output_logprobs.append(lp)
            seq.pending_logprobs.append(lp)
        params = seq.request.sampling
        reason: FinishReason | None = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            # The stop token ends the sequence; its text is not part of the output text.
            reason = FinishReason.STOP
        else:
            old_len = len(seq.text)
            self._detokenize(seq)
            if params.stop and self._cut_at_stop_string(seq, old_len):
                reason = FinishReason.STOP
        if reason is None and (
            len(seq.output_token_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            seq.delivered_len = len(seq.text)
        else:
            hold = max((len(s) for s in params.stop), default=1) - 1
            seq.delivered_len = max(seq.delivered_len, len(seq.text) - hold)
        return reason

    def restore(self, seq: Sequence, state: SequenceState) -> None:
        """Rebuild ``seq``'s text and offsets from its tokens exactly as the original run did."""
        tokens = list(state.output_token_ids)
        seq.output_token_ids = []
        for token in tokens:
            seq.output_token_ids.append(token)
            self._detokenize(seq)
        if not seq.text.startswith(state.output_text):
            # A different tokenizer produced the exported text: trust what the caller already has.
            seq.text = state.output_text
        seq.delivered_len = len(state.output_text)
        if state.output_logprobs is not None:
            seq.output_logprobs = list(state.output_logprobs)

    def _detokenize(self, seq: Sequence) -> None:
        if self.tokenizer is None:
            return
        ids = seq.token_slice(seq.prefix_offset, seq.num_tokens)
        prefix = self.tokenizer.decode(ids[: seq.read_offset - seq.prefix_offset])
        full = self.tokenizer.decode(ids)
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            seq.text += full[len(prefix) :]
            seq.prefix_offset = seq.read_offset
            seq.read_offset = seq.num_tokens

    @staticmethod
    def _cut_at_stop_string(seq: Sequence, old_len: int) -> bool:
        longest = max(len(s) for s in seq.request.sampling.stop)
        start = max(0, old_len - longest + 1)
        hits = [i for i in (seq.text.find(s, start) for s in seq.request.sampling.stop) if i >= 0]
        if not hits:
            return False
        seq.text = seq.text[: min(hits)]
        return True
