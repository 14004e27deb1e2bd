"""The sampler (greedy, filters, seeded streams, logprobs) and the stop checker (text, stops)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.worker.sampling import Sampler, seeded_uniform
from lorafleet.worker.sequence import Sequence
from lorafleet.worker.stop_checker import StopChecker
from lorafleet.worker.types import FinishReason, Request, SamplingParams


def test_greedy_and_logprobs() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]])
    params = [SamplingParams(temperature=0.0, logprobs=True), SamplingParams(temperature=0.0)]
    tokens, logprobs = Sampler(0).sample(logits, params, [0, 0])
    assert tokens == [1, 0]
    assert logprobs is not None
    assert logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))
    assert Sampler(0).sample(logits, [SamplingParams(temperature=0.0)] * 2, [0, 0])[1] is None


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    for p in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)):
        assert Sampler(1).sample(logits, [p] * 16, list(range(16)))[0] == best


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    sampler = Sampler(3)

    def freq(p: SamplingParams) -> list[float]:
        tokens, _ = sampler.sample(logits.expand(n, 4).clone(), [p] * n, [0] * n)
        return [tokens.count(i) / n for i in range(4)]

    plain = freq(SamplingParams(temperature=1.0))
    assert all(abs(f - q) < 0.03 for f, q in zip(plain, [0.5, 0.3, 0.15, 0.05]))
    top2 = freq(SamplingParams(temperature=1.0, top_k=2))
    assert top2[2] == top2[3] == 0 and abs(top2[0] - 0.625) < 0.03
    nucleus = freq(SamplingParams(temperature=1.0, top_p=0.7))  # keeps 0.5 and 0.3
    assert nucleus[2] == nucleus[3] == 0 and abs(nucleus[0] - 0.625) < 0.03
    hot = freq(SamplingParams(temperature=0.5))  # p^2 renormalised
    assert abs(hot[0] - 0.25 / 0.3775) < 0.03


def test_seeded_draws_depend_only_on_seed_and_index() -> None:
    assert seeded_uniform(7, 3) == seeded_uniform(7, 3)
    draws = {seeded_uniform(7, i) for i in range(100)} | {seeded_uniform(8, 0)}
    assert len(draws) == 101 and all(0 <= u < 1 for u in draws)
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0, seed=7)
    a = Sampler(0).sample(logits, [p], [5])[0]
    # Another engine seed and other rows in the batch do not change a seeded draw.
    b = Sampler(99).sample(torch.zeros(3, 1000), [SamplingParams(temperature=1.0), p, p], [0, 5, 6])[0]
    assert b[1] == a[0] and b[2] != a[0]


class CharTokenizer:
    """Token i is chr(i); 0xFF is half of a character (decodes to U+FFFD until 0xFE follows)."""

    def decode(self, ids: list[int]) -> str:
        text = ""
        for t in ids:
            if t == 0xFF:
                text += "\ufffd"
            elif t == 0xFE:
                text = text[:-1] + "é" if text.endswith("\ufffd") else text
            else:
                text += chr(t)
        return text


def _seq(params: SamplingParams, prompt: str = "ab") -> Sequence:
    return Sequence(Request("s", tuple(ord(c) for c in prompt), None, params), 0)


def _feed(checker: StopChecker, seq: Sequence, text: list[int]) -> tuple[list[str], FinishReason | None]:
    deltas, reason = [], None
    for t in text:
        sent = seq.delivered_len
        reason = checker.append_token(seq, t, None)
        deltas.append(seq.text[sent : seq.delivered_len])
        if reason:
            break
    return deltas, reason


def test_stop_string_held_back_across_tokens_and_cut() -> None:
    checker = StopChecker(CharTokenizer(), (1,), max_model_len=100)
    seq = _seq(SamplingParams(max_new_tokens=20, stop=("XYZ",)))
    deltas, reason = _feed(checker, seq, [ord(c) for c in "helloXY"] + [ord("Z"), ord("!")])
    assert reason == FinishReason.STOP
    # "XY" was never delivered before the stop string completed: two characters held back.
    assert "".join(deltas) == "hello" and all("X" not in d for d in deltas)
    assert seq.output_token_ids[-1] == ord("Z")


def test_partial_characters_wait_and_limits() -> None:
    checker = StopChecker(CharTokenizer(), (1,), max_model_len=6)
    seq = _seq(SamplingParams(max_new_tokens=10))
    deltas, reason = _feed(checker, seq, [ord("a"), 0xFF, 0xFE, ord("b"), ord("c")])
    assert deltas == ["a", "", "é", "b"] and reason == FinishReason.LENGTH  # 2 + 4 = context limit
    seq = _seq(SamplingParams(max_new_tokens=2))
    assert _feed(checker, seq, [ord("a"), ord("b"), ord("c")])[1] == FinishReason.LENGTH
    assert len(seq.output_token_ids) == 2
    seq = _seq(SamplingParams(max_new_tokens=5))
    deltas, reason = _feed(checker, seq, [ord("a"), 1, ord("b")])
    assert reason == FinishReason.STOP and deltas == ["a", ""] and seq.output_token_ids == [ord("a"), 1]


def test_restore_rebuilds_text_and_held_back_tail() -> None:
    checker = StopChecker(CharTokenizer(), (), max_model_len=100)
    params = SamplingParams(max_new_tokens=20, stop=("XYZ",))
    seq = _seq(params)
    _feed(checker, seq, [ord(c) for c in "hiXY"])
    state = seq.to_state()
    assert state.output_text == "hi"
    fresh = Sequence(state.request, 1)
    checker.restore(fresh, state)
    assert fresh.text == "hiXY" and fresh.delivered_len == 2
    deltas, reason = _feed(checker, fresh, [ord("Z")])
    assert reason == FinishReason.STOP and fresh.text == "hi" and deltas == [""]
