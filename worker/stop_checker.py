"""Append a sampled token to a sequence: incremental detokenisation and every stop condition."""

from __future__ import annotations

from typing import Protocol

from lorafleet.worker.sequence import Sequence
from lorafleet.worker.types import FinishReason, SequenceState

_REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 byte sequence


class Decoder(Protocol):
    """``decode``; a ``decode_batch(list of id lists) -> list of str`` is used when it exists."""

    def decode(self, ids: list[int]) -> str: ...


class StopChecker:
    def __init__(self, tokenizer: Decoder | None, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def append_token(self, seq: Sequence, token: int, logprob: float | None) -> FinishReason | None:
        """Record ``token`` as ``seq``'s next output; return why the sequence ends, if it does."""
        return self.append_tokens([(seq, token, logprob)])[0]

    def append_tokens(self, items: list[tuple[Sequence, int, float | None]]) -> list[FinishReason | None]:
        """``append_token`` for every sequence of a step, with the texts decoded in two batched
        tokenizer calls instead of two per sequence (the largest host cost of a decode step)."""
        reasons: list[FinishReason | None] = []
        texts: list[Sequence] = []
        for seq, token, logprob in items:
            seq.output_token_ids.append(token)
            seq.pending_token_ids.append(token)
            if seq.output_logprobs is not None:
                lp = float(logprob) if logprob is not None else float("nan")
                seq.output_logprobs.append(lp)
                seq.pending_logprobs.append(lp)
            params = seq.request.sampling
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
                # The stop token ends the sequence; its text is not part of the output text.
                reasons.append(FinishReason.STOP)
            else:
                reasons.append(None)
                texts.append(seq)
        old_lens = {id(seq): len(seq.text) for seq in texts}
        self._detokenize(texts)
        for i, (seq, _, _) in enumerate(items):
            params = seq.request.sampling
            reason = reasons[i]
            if reason is None and params.stop and self._cut_at_stop_string(seq, old_lens[id(seq)]):
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
            reasons[i] = reason
        return reasons

    def restore(self, seq: Sequence, state: SequenceState) -> None:
        """Rebuild ``seq``'s text and offsets from its tokens exactly as the original run did."""
        tokens = list(state.output_token_ids)
        seq.output_token_ids = []
        for token in tokens:
            seq.output_token_ids.append(token)
            self._detokenize([seq])
        if not seq.text.startswith(state.output_text):
            # A different tokenizer produced the exported text: trust what the caller already has.
            seq.text = state.output_text
        seq.delivered_len = len(state.output_text)
        if state.output_logprobs is not None:
            seq.output_logprobs = list(state.output_logprobs)
        if state.output_top_logprobs is not None:
            seq.output_top_logprobs = list(state.output_top_logprobs)

    def _detokenize(self, seqs: list[Sequence]) -> None:
        """Extend each sequence's text by what its newest tokens complete (held back while the
        decode ends in a partial UTF-8 character)."""
        if self.tokenizer is None or not seqs:
            return
        windows = [seq.token_slice(seq.prefix_offset, seq.num_tokens) for seq in seqs]
        prefixes = [ids[: seq.read_offset - seq.prefix_offset] for seq, ids in zip(seqs, windows)]
        batch = getattr(self.tokenizer, "decode_batch", None)
        if batch is not None:
            prefix_texts, full_texts = batch(prefixes), batch(windows)
        else:
            prefix_texts = [self.tokenizer.decode(ids) for ids in prefixes]
            full_texts = [self.tokenizer.decode(ids) for ids in windows]
        for seq, prefix, full in zip(seqs, prefix_texts, full_texts):
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
