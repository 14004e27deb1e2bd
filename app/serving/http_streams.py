"""The HTTP API's side of the fleet: one fleet stream per choice, merged, and errors as HTTP statuses.

`ChoiceStreams` runs each choice's `Fleet.generate` in its own task and merges the deltas in
arrival order. `start()` waits until every choice is admitted (its first delta) or refused, so an
admission error (unknown adapter, full queue, draining) becomes the response's status before any
byte is sent. `close()` aborts whatever has not finished, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from lorafleet.scheduler.errors import (
    AdapterInUseError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    ShuttingDownError,
    UnknownAdapterError,
)
from lorafleet.serving import openai_types as oai
from lorafleet.serving.fleet_abort import abort_quietly
from lorafleet.serving.metrics import RequestTracker, ServerMetrics
from lorafleet.serving.validation import FieldError
from lorafleet.worker.types import FinishReason, Request, TokenDelta

log = logging.getLogger(__name__)
_KINDS = {
    400: "invalid_request_error",
    404: "invalid_request_error",  # OpenAI's kind for an unknown model (code model_not_found)
    409: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class ClientGone(Exception):
    """The HTTP client disconnected; its fleet requests are being aborted."""


@dataclass
class HttpError(Exception):
    """An answer in OpenAI's error body; `status` is the metrics' (gRPC-named) status."""

    http_status: int
    message: str
    status: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return oai.error_body(
            self.message, _KINDS.get(self.http_status, "server_error"), self.param, self.code
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.http_status)


def http_error(exc: BaseException) -> HttpError:
    """The HTTP answer to a failure: the same mapping as the gRPC servicer's `status_for`."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, FieldError):
        return HttpError(400, str(exc), "invalid_argument", exc.field)
    if isinstance(exc, UnknownAdapterError):
        return HttpError(404, str(exc), "not_found", "model", "model_not_found")
    if isinstance(exc, QueueFullError):
        return HttpError(429, str(exc), "resource_exhausted", None, "queue_full")
    if isinstance(exc, AdapterInUseError):  # gRPC's FAILED_PRECONDITION
        return HttpError(409, f"lora_name: {exc}", "failed_precondition", "lora_name", "adapter_in_use")
    if isinstance(exc, ShuttingDownError):
        return HttpError(503, str(exc), "unavailable")
    if isinstance(exc, (InvalidRequestError, ValueError)):
        return HttpError(400, str(exc), "invalid_argument")
    if not isinstance(exc, RequestFailedError):
        log.error("HTTP request failed", exc_info=exc)
        return HttpError(500, f"{type(exc).__name__}: {exc}", "internal")
    return HttpError(500, str(exc), "internal")


_GONE = object()


class ChoiceStreams:
    """The fleet streams of one HTTP request's choices, merged; iterate for (choice, delta)."""

    def __init__(
        self,
        fleet: Any,
        requests: Sequence[Request],
        trackers: Sequence[RequestTracker],
        metrics: ServerMetrics | None,
    ) -> None:
        self.fleet = fleet
        self.requests = list(requests)
        self.trackers = list(trackers)
        self.metrics = metrics
        self.count = len(self.requests)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._buffer: list[tuple[int, TokenDelta | BaseException]] = []
        self._finished = [False] * self.count
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def start(self) -> None:
        """Start every choice; raises the first refusal (then call close())."""
        self._tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(self.requests)]
        seen: set[int] = set()
        while len(seen) < self.count:
            item = await self._queue.get()
            if item is _GONE:
                raise ClientGone()
            choice, payload = item
            if isinstance(payload, BaseException):
                raise payload
            seen.add(choice)
            self._buffer.append(item)

    async def _pump(self, i: int, request: Request) -> None:
        tracker, metrics = self.trackers[i], self.metrics
        stream = self.fleet.generate(request)
        admitted = False
        if metrics is not None:
            metrics.in_flight.labels(api="http").inc()
        try:
            async for delta in stream:
                now = time.monotonic()
                if not admitted and metrics is not None:
                    metrics.request_admitted(len(request.prompt_token_ids))  # refusals raise before this
                admitted = True
                if delta.finish_reason is FinishReason.ERROR:
                    raise RequestFailedError(request.request_id, delta.error or "no reason given")
                tracker.tokens(len(delta.new_token_ids), now)
                self._queue.put_nowait((i, delta))
                if delta.finished:
                    tracker.finish("cancelled" if delta.finish_reason is FinishReason.ABORT else "ok", now)
                    return
            raise RequestFailedError(request.request_id, "the fleet ended the stream without a finish")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            tracker.finish(http_error(exc).status, time.monotonic())
            self._queue.put_nowait((i, exc))
        finally:
            if metrics is not None:
                metrics.in_flight.labels(api="http").dec()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def client_gone(self) -> None:
        self._queue.put_nowait(_GONE)

    async def __aiter__(self) -> AsyncIterator[tuple[int, TokenDelta]]:
        while not all(self._finished):
            if self._buffer:
                item = self._buffer.pop(0)
            else:
                item = await self._queue.get()
            if item is _GONE:
                raise ClientGone()
            choice, payload = item
            if isinstance(payload, BaseException):
                raise payload
            if payload.finished:
                self._finished[choice] = True
            yield choice, payload

    async def close(self) -> None:
        """Abort every choice still running (frees its KV blocks); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        aborts = []
        for i, task in enumerate(self._tasks):
            if not task.done():
                task.cancel()
                self.trackers[i].finish("cancelled", now)
                aborts.append(
                    abort_quietly(self.fleet, self.requests[i].request_id, log, "abort of %s raised")
                )
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if aborts:
            await asyncio.gather(*aborts)
