"""The text of one SSE chunk of a streamed completion, written for the per-token path.

A stream sends one chunk per decode step, and `json.dumps(body, ensure_ascii=False)` cost about
15 us each (a new JSONEncoder per call, then the whole body), several times the rest of the HTTP
path's Python work for a token. The fields that never change in a stream (id, object, created,
model) are encoded once; the choices, whose values are strings, small ints, None and nested
objects of those, are written with the C string escaper that json.dumps itself uses; anything
else (logprobs' lists and floats) goes through json.dumps. The text is exactly what
`json.dumps(body, ensure_ascii=False)` gives for the same body (tests/api/test_sse_chunks.py).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # json.dumps' escaper when ensure_ascii=False
from typing import Any


def _value(value: Any) -> str:
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is int:
        return int.__repr__(value)
    if kind is dict:
        return _object(value)
    return json.dumps(value, ensure_ascii=False)  # lists, floats, bools: the general encoder


def _object(obj: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{encode_basestring(k)}: {_value(v)}" for k, v in obj.items()) + "}"


class ChunkWriter:
    """The `data: {...}\\n\\n` lines of one stream: id, object, created, model, choices[, usage]."""

    def __init__(self, *, id: str, object: str, created: int, model: str, include_usage: bool) -> None:
        head = {"id": id, "object": object, "created": created, "model": model}
        self._prefix = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['
        self._include_usage = include_usage

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        text = self._prefix + ", ".join(_object(c) for c in choices)
        if self._include_usage:
            return f"{text}], {_usage(usage)}}}\n\n"
        return text + "]}\n\n"


def _usage(usage: dict[str, int] | None) -> str:
    return '"usage": ' + ("null" if usage is None else _object(usage))
