"""The HTTP API's logprobs shapes (OpenAI's) from the fleet's deltas, and their request parsing."""

from __future__ import annotations

import pytest

from lorafleet.serving import openai_types as oai
from lorafleet.serving.http_logprobs import ChoiceLogprobs
from lorafleet.serving.validation import FieldError
from lorafleet.worker.types import TokenDelta


def strings(ids: tuple[int, ...]) -> list[str]:
    return [{1: "a", 2: "b", 3: "a", 4: "é"}[t] for t in ids]


def test_chat_and_completion_shapes_with_alternatives() -> None:
    lp = ChoiceLogprobs(alternatives=True)
    lp.add(
        strings,
        TokenDelta("r", (1,), new_logprobs=(-0.1,), new_top_logprobs=(((1, -0.1), (3, -0.2), (2, -3.0)),)),
    )
    step = ChoiceLogprobs(alternatives=True)
    step.add(
        strings,
        TokenDelta("r", (4,), new_logprobs=(-0.5,), new_top_logprobs=(((4, -0.5), (2, -0.9), (1, -1.0)),)),
    )
    lp.extend(step)
    chat = lp.shape(chat=True, offset=0)["content"]
    assert [c["token"] for c in chat] == ["a", "é"] and chat[1]["bytes"] == [0xC3, 0xA9]
    assert chat[0]["top_logprobs"] == [
        {"token": "a", "logprob": -0.1, "bytes": [97]},
        {"token": "a", "logprob": -0.2, "bytes": [97]},
        {"token": "b", "logprob": -3.0, "bytes": [98]},
    ]
    done = lp.shape(chat=False, offset=5)
    assert done["tokens"] == ["a", "é"] and done["token_logprobs"] == [-0.1, -0.5]
    assert done["text_offset"] == [5, 6]
    # Keyed by text: two ids that decode alike keep the likelier one.
    assert done["top_logprobs"] == [{"a": -0.1, "b": -3.0}, {"é": -0.5, "b": -0.9, "a": -1.0}]
    assert step.shape(chat=False, offset=6)["top_logprobs"] == [{"é": -0.5, "b": -0.9, "a": -1.0}]


def test_without_alternatives_and_with_a_delta_lacking_them() -> None:
    plain = ChoiceLogprobs(alternatives=False)
    plain.add(strings, TokenDelta("r", (1, 2), new_logprobs=(-0.1, -0.2)))
    assert plain.shape(chat=False, offset=0)["top_logprobs"] is None
    assert [c["top_logprobs"] for c in plain.shape(chat=True, offset=0)["content"]] == [[], []]
    # A delta without alternatives keeps one (empty) list per token: no token is dropped.
    asked = ChoiceLogprobs(alternatives=True)
    asked.add(strings, TokenDelta("r", (1, 2), new_logprobs=(-0.1, -0.2)))
    assert [c["token"] for c in asked.shape(chat=True, offset=0)["content"]] == ["a", "b"]
    assert asked.shape(chat=False, offset=0)["top_logprobs"] == [{}, {}]


def test_parsing_sets_top_logprobs_with_grpc_bounds() -> None:
    chat = oai.parse_chat(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 20}
    )
    assert chat.logprobs and chat.sampling.logprobs and chat.sampling.top_logprobs == 20
    plain = oai.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 0})
    assert not plain.logprobs and plain.sampling.top_logprobs == 0
    comp = oai.parse_completion({"model": "m", "prompt": "x", "logprobs": 3})
    assert comp.logprobs and comp.sampling.logprobs and comp.sampling.top_logprobs == 3
    zero = oai.parse_completion({"model": "m", "prompt": "x", "logprobs": 0})
    assert zero.logprobs and zero.sampling.top_logprobs == 0
    assert not oai.parse_completion({"model": "m", "prompt": "x"}).sampling.logprobs
    for body, field, needle in [
        (
            {"model": "m", "prompt": "x", "logprobs": 21},
            "logprobs",
            "logprobs must be an integer in [0, 20], got 21",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
            "needs logprobs",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "top_logprobs": -1,
            },
            "top_logprobs",
            "top_logprobs must be an integer in [0, 20], got -1",
        ),
    ]:
        parse = oai.parse_chat if "messages" in body else oai.parse_completion
        with pytest.raises(FieldError, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
            parse(body)
        assert info.value.field == field
