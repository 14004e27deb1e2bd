"""Request validation shared by every API: gRPC (convert.py) and HTTP (http_api.py) call these.

Both APIs turn their request into plain values and hand them here, so a field is valid on one API
exactly when it is valid on the other. Errors are `FieldError`s (a ValueError) that name the field
as the caller spelled it: each API passes its own spelling (`max_tokens` over HTTP,
`max_new_tokens` over gRPC) in `names`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lorafleet.worker.types import MAX_TOP_LOGPROBS, Request, SamplingParams

# SamplingParams fields an API may set; anything else is a caller's typo, not something to ignore.
SAMPLING_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop_token_ids",
    "stop",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
)


class FieldError(ValueError):
    """A bad request field; `field` is its name in the caller's API (None: the request as a whole)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def sampling_params(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> SamplingParams:
    """SamplingParams from the fields a caller set (unset ones take the defaults).

    Checks types as well as ranges, since JSON can carry a string or a boolean where a number
    belongs; `names` maps a SamplingParams field to the caller's name for it in error messages.
    """
    names = names or {}

    def fail(key: str, message: str) -> FieldError:
        name = names.get(key, key)
        return FieldError(name, f"{name} {message}")

    unknown = sorted(set(values) - set(SAMPLING_FIELDS))
    if unknown:
        raise FieldError(unknown[0], f"unknown sampling parameter(s): {', '.join(unknown)}")
    v = dict(values)
    if "max_new_tokens" in v and (not _is_int(v["max_new_tokens"]) or v["max_new_tokens"] < 1):
        raise fail("max_new_tokens", f"must be an integer >= 1, got {v['max_new_tokens']!r}")
    if "temperature" in v and (not _is_number(v["temperature"]) or v["temperature"] < 0):
        raise fail("temperature", f"must be a number >= 0 (0 = greedy), got {v['temperature']!r}")
    if "top_k" in v and (not _is_int(v["top_k"]) or v["top_k"] < 0):
        raise fail("top_k", f"must be an integer >= 0 (0 disables it), got {v['top_k']!r}")
    if "top_p" in v and (not _is_number(v["top_p"]) or not 0 < v["top_p"] <= 1):
        raise fail("top_p", f"must be a number in (0, 1], got {v['top_p']!r}")
    if "seed" in v and (not _is_int(v["seed"]) or not 0 <= v["seed"] < 2**63):
        raise fail("seed", f"must be an integer in [0, 2**63), got {v['seed']!r}")
    for key in ("ignore_eos", "logprobs"):
        if key in v and not isinstance(v[key], bool):
            raise fail(key, f"must be true or false, got {v[key]!r}")
    if "top_logprobs" in v:
        top = v["top_logprobs"]
        if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise fail("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}")
        if top and not v.get("logprobs"):
            raise fail("top_logprobs", "needs logprobs set to true")
    if "stop_token_ids" in v:
        ids = v["stop_token_ids"]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(_is_int(t) for t in ids):
            raise fail("stop_token_ids", f"must be a list of integer token ids, got {ids!r}")
        if any(t < 0 for t in ids):
            raise fail("stop_token_ids", f"must be non-negative token ids, got {list(ids)}")
        v["stop_token_ids"] = tuple(ids)
    if "stop" in v:
        stop = v["stop"]
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise fail("stop", f"must be a string or a list of strings, got {v['stop']!r}")
        if any(s == "" for s in stop):
            raise fail("stop", "strings must be non-empty")
        v["stop"] = tuple(stop)
    return SamplingParams(**v)


def prompt_token_ids(
    prompt: str | Sequence[int],
    *,
    encode: Callable[[str], Sequence[int]],
    vocab_size: int | None,
    max_context_tokens: int | None,
    field: str = "prompt",
) -> tuple[int, ...]:
    """The prompt's token ids (text is encoded), checked against the vocabulary and the context."""
    if isinstance(prompt, str):
        if not prompt:
            raise FieldError(field, f"{field}: the prompt is empty")
        token_ids = tuple(int(t) for t in encode(prompt))
    else:
        if not all(_is_int(t) for t in prompt):
            raise FieldError(field, f"{field}: token ids must be integers")
        token_ids = tuple(prompt)
    if not token_ids:
        raise FieldError(field, f"{field}: the prompt is empty")
    return check_prompt_ids(
        token_ids, vocab_size=vocab_size, max_context_tokens=max_context_tokens, field=field
    )


def check_prompt_ids(
    token_ids: tuple[int, ...], *, vocab_size: int | None, max_context_tokens: int | None, field: str
) -> tuple[int, ...]:
    if vocab_size is not None:
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise FieldError(field, f"{field}: prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
    if max_context_tokens is not None and len(token_ids) >= max_context_tokens:
        raise FieldError(
            field,
            f"{field}: the prompt has {len(token_ids)} tokens; the model's context is "
            f"{max_context_tokens} tokens, so the prompt must be shorter than that",
        )
    return token_ids


def check_stop_token_ids(
    sampling: SamplingParams, vocab_size: int | None, field: str = "stop_token_ids"
) -> None:
    if vocab_size is not None:
        bad = [t for t in sampling.stop_token_ids if t >= vocab_size]
        if bad:
            raise FieldError(field, f"{field} must be in [0, {vocab_size}), got {bad[:5]}")


def build_request(
    *,
    request_id: str,
    token_ids: tuple[int, ...],
    adapter: str | None,
    sampling: SamplingParams,
    arrival_time: float,
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=token_ids,
        adapter=adapter or None,
        sampling=sampling,
        arrival_time=arrival_time,
    )
