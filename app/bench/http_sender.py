"""`lorafleet bench --http URL`: the bench's requests through the OpenAI-compatible HTTP API.

The workload, the adapter choice and the report are runner.py's; only the generation calls change:
each request is a streaming `/v1/completions` call with the same token-id prompt and greedy
sampling as over gRPC. The control calls (model status, adapter aliases, the worker sampler) stay
on gRPC (`--server`), so both runs see the same fleet counters.

Timing matches the gRPC path: a chunk carries one step's delta, so the first and last chunks with
choices are the first and last tokens, each timed when its bytes arrive; the token count is the
final usage chunk's. The HTTP client is sse_client.py's, which parses each chunk where it is read:
the load generator shares the machine with the server it measures, so its per-token cost counts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from lorafleet.bench.runner import RequestRecord
from lorafleet.client.sse_client import HttpClientError, SseClient

# The bench's status names (gRPC's, lower case) for the HTTP answers, as the server's metrics use.
_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    429: "resource_exhausted",
    500: "internal",
    503: "unavailable",
}

Send = Callable[[RequestRecord, list[int], int, float], Awaitable[None]]
# json.loads on bytes first sniffs the encoding; the server's chunks are UTF-8, so decode directly.
_DECODE = json.JSONDecoder().decode


def base_url(url: str) -> str:
    """http://HOST:PORT or http://HOST:PORT/v1 -> http://HOST:PORT (ValueError otherwise)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--http must be a URL like http://127.0.0.1:8000, got {url!r}")
    return url.removesuffix("/v1")


class _Stream:
    """One completion's events, folded into its RequestRecord as they arrive."""

    __slots__ = ("done", "finish", "record", "usage")

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.finish: str | None = None
        self.usage = False
        self.done = False

    def on_event(self, data: bytes, now: float) -> None:
        if self.done:
            raise HttpClientError("an event after data: [DONE]")
        if data == b"[DONE]":
            self.done = True
            return
        chunk = _DECODE(data.decode())
        record = self.record
        if "error" in chunk:  # the server failed mid-stream; it still ends the stream with [DONE]
            record.status, record.error = "internal", str(chunk["error"].get("message", ""))
            return
        choices = chunk["choices"]
        if choices:
            if record.first_token_at is None:
                record.first_token_at = now
            record.last_token_at = now
            self.finish = choices[0]["finish_reason"] or self.finish
        usage = chunk.get("usage")
        if usage:
            record.tokens = usage["completion_tokens"]
            self.usage = True

    def verdict(self) -> None:
        """After the stream: only one that finished, reported usage and ended in [DONE] is ok."""
        record = self.record
        if record.status != "ok":
            return
        if self.finish is None:
            record.status, record.error = "incomplete", "the stream ended without a finish reason"
        elif self.finish == "abort":
            record.status, record.error = "aborted", "the server aborted the request"
        elif not self.usage:
            record.status, record.error = "incomplete", "the stream ended without a usage chunk"
        elif not self.done:
            record.status, record.error = "incomplete", "the stream ended without data: [DONE]"


def http_sender(client: SseClient, base_model: str) -> Send:
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
        stream = _Stream(record)
        payload = json.dumps(body).encode()
        record.sent_at = time.monotonic()
        try:
            reply = await client.stream(
                "POST", "/v1/completions", body=payload, on_event=stream.on_event, timeout=timeout_s
            )
            if reply.status != 200:
                record.status = _STATUS.get(reply.status, f"http_{reply.status}")
                record.error = _error_message(reply.body.decode(errors="replace"))
            elif reply.body:
                record.status, record.error = "internal", "a 200 reply that is not an event stream"
            else:
                stream.verdict()
        except asyncio.TimeoutError:
            record.status, record.error = "deadline_exceeded", f"no end within {timeout_s:g} s"
        except (OSError, HttpClientError, ValueError, KeyError, TypeError) as exc:
            # Connection failures, broken framing, or a chunk that is not a completion chunk.
            record.status, record.error = "unavailable", f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            # Cut off by the caller: not a completed request, whatever arrived before (runner.py).
            record.status, record.error = "cancelled", "the client stopped waiting before the stream ended"
            raise
        finally:
            record.done_at = time.monotonic()

    return send


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]
