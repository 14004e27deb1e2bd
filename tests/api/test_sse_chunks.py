"""sse_chunks.ChunkWriter writes exactly what json.dumps(body, ensure_ascii=False) would."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lorafleet.serving import openai_types as oai
from lorafleet.serving.sse_chunks import ChunkWriter

TEXTS = ["", " hello", 'quote " and \\ back', "tab\tnew\nline\r\x00\x1f\x7f", "é ü 中文 🙂", "\ud800"]

CHOICES: list[dict[str, Any]] = [
    {"index": 0, "text": t, "logprobs": None, "finish_reason": f}
    for t in TEXTS
    for f in (None, "stop", "length")
] + [
    {"index": 3, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
    {"index": 1, "delta": {"content": "é\n"}, "logprobs": None, "finish_reason": "stop"},
    {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"},
    {
        "index": 0,
        "text": "ab",
        "logprobs": oai.completion_logprobs(["a", "b"], [-0.5, -1e-9], 7),
        "finish_reason": None,
    },
    {
        "index": 0,
        "delta": {"content": "a"},
        "logprobs": oai.chat_logprobs(["a"], [-0.25]),
        "finish_reason": None,
    },
    {
        "index": 0,
        "text": "ab",
        "logprobs": oai.completion_logprobs(
            ["a", "é"], [-0.5, -0.25], 0, [[("a", -0.5), ("b", -1.5)], [("é", -0.25)]]
        ),
        "finish_reason": None,
    },
    {
        "index": 0,
        "delta": {"content": "é"},
        "logprobs": oai.chat_logprobs(["é"], [-0.25], [[("é", -0.25), ('"', -2.0)]]),
        "finish_reason": None,
    },
    {"index": 2**40, "text": "x", "logprobs": None, "finish_reason": None, "flag": True, "ratio": 0.1},
]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("model", ["adapter-3", 'we"ird\\name é'])
def test_chunks_equal_json_dumps(include_usage: bool, model: str) -> None:
    head = {"id": "cmpl-1f2e", "object": "text_completion", "created": 1764489600, "model": model}
    writer = ChunkWriter(**head, include_usage=include_usage)
    usage = oai.usage(16, 256)
    cases = [([c], None) for c in CHOICES] + [(CHOICES[:3], None), ([], usage), ([], None)]
    for choices, use in cases:
        body = {**head, "choices": choices}
        if include_usage:
            body["usage"] = use
        assert writer.chunk(choices, use) == f"data: {json.dumps(body, ensure_ascii=False)}\n\n", choices
