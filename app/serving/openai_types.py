"""The OpenAI-compatible request and response shapes, as plain dicts and dataclasses.

Request bodies are parsed by hand rather than by a pydantic model: every bad field must come back
as an OpenAI error body (HTTP 400) whose message and `param` name the field, and the sampling
fields go through validation.py, the checks gRPC requests pass too. Unknown fields are refused,
and so are OpenAI fields lorafleet cannot honour (penalties, tools, ...), rather than ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorafleet.serving.validation import FieldError, sampling_params
from lorafleet.worker.types import FinishReason, SamplingParams

# OpenAI field -> SamplingParams field (same validation as gRPC; errors use the OpenAI name).
_SAMPLING_NAMES = {
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",  # extension (vLLM has it too)
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",  # extension
    "ignore_eos": "ignore_eos",  # extension
}
_COMMON = {"model", "stream", "stream_options", "n", "user", "return_tokens_as_token_ids", *_SAMPLING_NAMES}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
# OpenAI fields whose neutral value is accepted (clients send defaults) and any other refused.
_NEUTRAL: dict[str, Any] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "best_of": 1,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "parallel_tool_calls": None,
    "response_format": None,
    "service_tier": None,
    "store": None,
    "metadata": None,
}
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_N = 128  # choices per request: each one is a sequence in the fleet


def bad(param: str | None, message: str) -> FieldError:
    return FieldError(param, message)


@dataclass(frozen=True)
class GenerationSpec:
    """A parsed completion or chat request: what to send to the fleet and how to answer."""

    model: str
    prompts: list[str | list[int]]  # one entry per prompt; chat: the one rendered conversation
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: bool = False
    tokens_as_ids: bool = False
    user: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    max_tokens_set: bool = True  # chat without max_tokens: up to the model's context


def _check_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in _NEUTRAL:
            neutral = _NEUTRAL[key]
            if value is None or value == neutral or (key == "response_format" and value == {"type": "text"}):
                continue
            raise bad(key, f"{key} is not supported by lorafleet (only {neutral!r} or null)")
        raise bad(key, f"unknown field {key!r}")


def _optional(body: Mapping[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise bad(key, f"{key} must be {what}, got {value!r}")
    if not isinstance(value, kinds):
        raise bad(key, f"{key} must be {what}, got {value!r}")
    return value


def _sampling(
    body: Mapping[str, Any], max_tokens_key: str = "max_tokens", logprobs: Mapping[str, Any] | None = None
) -> SamplingParams:
    """SamplingParams of the body's sampling fields, checked as gRPC's are; `logprobs`: the
    SamplingParams logprobs / top_logprobs values the caller parsed, under the body's field names."""
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for openai_name, ours in _SAMPLING_NAMES.items():
        key = max_tokens_key if openai_name == "max_tokens" else openai_name
        if body.get(key) is not None:
            values[ours] = body[key]
            names[ours] = key
    for (ours, name), value in (logprobs or {}).items():
        values[ours] = value
        names[ours] = name
    return sampling_params(values, names)


def _common(body: Mapping[str, Any]) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: the base model's name or an adapter's name")
    n = _optional(body, "n", (int,), "an integer >= 1")
    if n is not None and not 1 <= n <= MAX_N:
        raise bad("n", f"n must be an integer in [1, {MAX_N}], got {n!r}")
    stream = _optional(body, "stream", (bool,), "true or false") or False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options", f"stream_options must be {{'include_usage': bool}}, got {options!r}")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise bad("stream_options", "stream_options.include_usage must be true or false")
    user = _optional(body, "user", (str,), "a string")
    as_ids = _optional(body, "return_tokens_as_token_ids", (bool,), "true or false") or False
    return {
        "model": model,
        "n": n or 1,
        "stream": stream,
        "include_usage": include_usage,
        "user": user,
        "tokens_as_ids": as_ids,
    }


def parse_completion(body: Any) -> GenerationSpec:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    _check_fields(body, COMPLETION_FIELDS)
    common = _common(body)
    prompt = body.get("prompt")
    prompts: list[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)
    ):
        prompts = [list(p) for p in prompt]
    else:
        raise bad(
            "prompt",
            "prompt must be a non-empty string, a list of strings, a list of token ids or a list of "
            f"token-id lists, got {_short(prompt)}",
        )
    if any(p == "" for p in prompts):
        raise bad("prompt", "prompt: the prompt is empty")
    # Completions' logprobs is a count: the chosen tokens' logprobs and the `logprobs` most likely
    # alternatives of each step (gRPC's top_logprobs, with its bounds).
    logprobs = _optional(body, "logprobs", (int,), "an integer")
    echo = _optional(body, "echo", (bool,), "true or false") or False
    if echo and logprobs is not None:
        raise bad("echo", "echo with logprobs needs the prompt's logprobs, which lorafleet does not compute")
    asked = {}
    if logprobs is not None:
        asked = {("logprobs", "logprobs"): True, ("top_logprobs", "logprobs"): logprobs}
    # Unset max_tokens: SamplingParams' default, 16, which is OpenAI's default for completions too.
    return GenerationSpec(
        prompts=prompts,
        sampling=_sampling(body, logprobs=asked),
        logprobs=logprobs is not None,
        echo=echo,
        **common,
    )


def parse_chat(body: Any) -> GenerationSpec:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    _check_fields(body, CHAT_FIELDS)
    common = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"messages must be a non-empty list of messages, got {_short(messages)}")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    logprobs = _optional(body, "logprobs", (bool,), "true or false") or False
    top = _optional(body, "top_logprobs", (int,), "an integer")
    asked: dict[tuple[str, str], Any] = {("logprobs", "logprobs"): logprobs}
    if top is not None:  # bounds, and that it needs logprobs: gRPC's checks (validation.py)
        asked[("top_logprobs", "top_logprobs")] = top
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("max_completion_tokens", "set max_tokens or max_completion_tokens, not both")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return GenerationSpec(
        prompts=[],
        sampling=_sampling(body, key, asked),
        logprobs=logprobs,
        messages=parsed,
        max_tokens_set=body.get(key) is not None,
        **common,
    )


def _message(i: int, message: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad(where, f"{where} must be an object with role and content, got {_short(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones can reach a text model
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad(
                    f"{where}.content[{j}]",
                    f"{where}.content[{j}] must be {{'type': 'text', 'text': str}} (text only)",
                )
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts")
    out: dict[str, Any] = {"role": role, "content": content}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def finish_reason(reason: FinishReason | None) -> str | None:
    # OpenAI knows stop / length; an aborted request (server stopping) says so instead of lying.
    return None if reason is None else reason.value


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# One step's most likely tokens, best first, as (token string, logprob).
Alternatives = Sequence[tuple[str, float]]


def completion_logprobs(
    tokens: Sequence[str],
    logprobs: Sequence[float],
    offset: int,
    tops: Sequence[Alternatives] | None = None,
) -> dict[str, Any]:
    """Completions' logprobs object; `tops` (one per token) with `logprobs: N` > 0, else null."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": list(tokens),
        "token_logprobs": list(logprobs),
        "top_logprobs": None if tops is None else [_top_dict(top) for top in tops],
        "text_offset": offsets,
    }


def _top_dict(top: Alternatives) -> dict[str, float]:
    # The legacy shape is keyed by token text: two ids that decode alike keep the likelier one.
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(token, logprob)
    return out


def chat_logprobs(
    tokens: Sequence[str], logprobs: Sequence[float], tops: Sequence[Alternatives] | None = None
) -> dict[str, Any]:
    """Chat's logprobs object: per token its logprob, UTF-8 bytes and alternatives (`tops`)."""
    alternatives = tops if tops is not None else [()] * len(tokens)
    return {
        "content": [
            {
                "token": t,
                "logprob": lp,
                "bytes": list(t.encode("utf-8")),
                "top_logprobs": [
                    {"token": at, "logprob": alp, "bytes": list(at.encode("utf-8"))} for at, alp in top
                ],
            }
            for t, lp, top in zip(tokens, logprobs, alternatives)
        ]
    }


def model_card(name: str, root: str, parent: str | None, created: int, max_model_len: int) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "lorafleet",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
    }
