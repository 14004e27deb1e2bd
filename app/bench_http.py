"""`lorafleet bench --http URL`: the bench's requests through the OpenAI-compatible HTTP API.

The workload, the adapter choice and the report are bench.py's; only the generation calls change:
each request is a streaming `/v1/completions` call with the same token-id prompt and greedy
sampling as over gRPC. The control calls (model status, adapter aliases, the worker sampler) stay
on gRPC (`--server`), so both runs see the same fleet counters.

Timing matches the gRPC path: a chunk carries one step's delta, so the first and last chunks with
choices are the first and last tokens; the token count is the final usage chunk's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import httpx

from lorafleet.bench import RequestRecord

# The bench's status names (gRPC's, lower case) for the HTTP answers, as the server's metrics use.
_STATUS = {
    400: "invalid_argument",
    404: "not_found",
    429: "resource_exhausted",
    500: "internal",
    503: "unavailable",
}

Send = Callable[[RequestRecord, list[int], int, float], Awaitable[None]]


def base_url(url: str) -> str:
    """http://HOST:PORT or http://HOST:PORT/v1 -> http://HOST:PORT (ValueError otherwise)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--http must be a URL like http://127.0.0.1:8000, got {url!r}")
    return url.removesuffix("/v1")


def http_sender(client: httpx.AsyncClient, base_model: str) -> Send:
    """A bench `send` that streams one completion over HTTP into its RequestRecord."""

    async def send(record: RequestRecord, prompt: list[int], max_new_tokens: int, timeout_s: float) -> None:
        body = {
            "model": record.adapter or base_model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        record.sent_at = time.monotonic()
        finish = None
        try:
            async with client.stream("POST", "/v1/completions", json=body, timeout=timeout_s) as reply:
                if reply.status_code != 200:
                    text = (await reply.aread()).decode(errors="replace")
                    record.status = _STATUS.get(reply.status_code, f"http_{reply.status_code}")
                    record.error = _error_message(text)
                    return
                async for line in reply.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        record.status, record.error = "internal", chunk["error"].get("message", "")
                        return
                    now = time.monotonic()
                    if chunk["choices"]:
                        if record.first_token_at is None:
                            record.first_token_at = now
                        record.last_token_at = now
                        finish = chunk["choices"][0]["finish_reason"] or finish
                    if chunk.get("usage"):
                        record.tokens = chunk["usage"]["completion_tokens"]
            if finish is None:
                record.status, record.error = "incomplete", "the stream ended without a finish reason"
            elif finish == "abort":
                record.status, record.error = "aborted", "the server aborted the request"
        except httpx.HTTPError as exc:
            record.status, record.error = "unavailable", f"{type(exc).__name__}: {exc}"
        finally:
            record.done_at = time.monotonic()

    return send


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]
