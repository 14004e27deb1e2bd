"""The gRPC servicer of `lorafleet.v1.LoraFleet` over a `Fleet` (grpc.aio).

It validates and converts requests (convert.py), streams the fleet's token deltas, and maps every
failure to a status with a message: unknown adapter NOT_FOUND, bad parameters INVALID_ARGUMENT,
queue full RESOURCE_EXHAUSTED, shutting down UNAVAILABLE, a failed request INTERNAL. A cancelled
call or a passed deadline aborts the sequence on its worker (`fleet.abort`), which frees its KV
blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import grpc

from lorafleet.proto.lorafleet.v1 import serving_pb2 as pb
from lorafleet.proto.lorafleet.v1 import serving_pb2_grpc
from lorafleet.scheduler.errors import (
    AdapterInUseError,
    FleetError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    ShuttingDownError,
    UnknownAdapterError,
)
from lorafleet.serving import convert
from lorafleet.serving.api_types import ModelView, Usage
from lorafleet.serving.fleet_abort import abort_quietly
from lorafleet.serving.metrics import RequestTracker, ServerMetrics
from lorafleet.worker.types import FinishReason, Request, TokenDelta

log = logging.getLogger(__name__)


class FleetLike(Protocol):
    """The part of `lorafleet.scheduler.fleet.Fleet` the servicer uses (tests pass a fake)."""

    def generate(self, request: Request) -> AsyncIterator[TokenDelta]: ...
    async def abort(self, request_id: str) -> None: ...
    def register_adapter(self, name: str, path: str) -> None: ...
    def unregister_adapter(self, name: str) -> None: ...
    def list_adapters(self) -> dict[str, str]: ...
    def status(self) -> Any: ...


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status a fleet (or validation) error is answered with."""
    if isinstance(error, UnknownAdapterError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, AdapterInUseError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, ShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, (InvalidRequestError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, KeyError):
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.INTERNAL


def _message(error: BaseException) -> str:
    # KeyError quotes its argument in str(); show the bare message.
    if isinstance(error, KeyError) and error.args and not isinstance(error, UnknownAdapterError):
        return str(error.args[0])
    return str(error) or type(error).__name__


class LoraFleetServicer(serving_pb2_grpc.LoraFleetServicer):
    def __init__(
        self,
        fleet: FleetLike,
        *,
        model: ModelView,
        encode: Callable[[str], Sequence[int]],
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.fleet = fleet
        self.model = model
        self.encode = encode
        self.metrics = metrics
        self.closing = False  # set at shutdown: new calls get UNAVAILABLE, running streams finish

    # ------------------------------------------------------------------ Generate

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # A coroutine writing with context.write (not an async generator), so that a cancelled
        # call always surfaces here as CancelledError, wherever the handler is waiting.
        arrival = time.monotonic()
        tracker = RequestTracker(self.metrics, "grpc", request.adapter or None, arrival)
        if self.closing:
            tracker.finish("unavailable", time.monotonic())
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        request_id = request.request_id or uuid.uuid4().hex
        try:
            engine_request = convert.request_from_proto(
                request,
                encode=self.encode,
                request_id=request_id,
                arrival_time=time.time(),
                vocab_size=self.model.vocab_size or None,
                max_context_tokens=self.model.max_context_tokens or None,
            )
        except ValueError as exc:
            tracker.finish("invalid_argument", time.monotonic())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {request_id}: {exc}")
        tracker.prompt_tokens = len(engine_request.prompt_token_ids)
        if self.metrics is not None:
            self.metrics.in_flight.labels(api="grpc").inc()
        failure = await self._stream(engine_request, context, tracker)
        if failure is not None:
            code, message = failure
            tracker.finish(code.name.lower(), time.monotonic())
            await context.abort(code, message)

    async def _stream(
        self, request: Request, context: grpc.aio.ServicerContext, tracker: RequestTracker
    ) -> tuple[grpc.StatusCode, str] | None:
        """Relay the fleet's deltas; returns the failure to answer with, or None on success."""
        request_id = request.request_id
        stream = self.fleet.generate(request)
        admitted = False
        try:
            async for delta in stream:
                now = time.monotonic()
                if not admitted and self.metrics is not None:
                    # The fleet raises before its first delta if it refuses the request.
                    self.metrics.request_admitted(len(request.prompt_token_ids))
                admitted = True
                if delta.finish_reason is FinishReason.ERROR:
                    await self._abort_quietly(request_id)
                    return (
                        grpc.StatusCode.INTERNAL,
                        f"request {request_id} failed: {delta.error or 'no reason given'}",
                    )
                tracker.tokens(len(delta.new_token_ids), now)
                if delta.num_prompt_tokens:
                    tracker.prompt_tokens = delta.num_prompt_tokens
                await context.write(
                    convert.delta_to_proto(delta, _usage(tracker, now) if delta.finished else None)
                )
                if delta.finished:
                    tracker.finish("cancelled" if delta.finish_reason is FinishReason.ABORT else "ok", now)
                    return None
            return (
                grpc.StatusCode.INTERNAL,
                f"request {request_id}: the fleet ended the stream without a finish",
            )
        except asyncio.CancelledError:
            # The client went away or its deadline passed: free the sequence's blocks now.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            tracker.finish("deadline_exceeded" if expired else "cancelled", time.monotonic())
            await self._abort_quietly(request_id)
            raise
        except FleetError as exc:
            if isinstance(exc, RequestFailedError):
                await self._abort_quietly(request_id)
            return status_for(exc), _message(exc)
        except ValueError as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, f"request {request_id}: {exc}"
        except Exception as exc:
            log.exception("request %s failed", request_id)
            await self._abort_quietly(request_id)
            return grpc.StatusCode.INTERNAL, f"request {request_id} failed: {type(exc).__name__}: {exc}"
        finally:
            if self.metrics is not None:
                self.metrics.in_flight.labels(api="grpc").dec()
            await _close(stream)

    async def _abort_quietly(self, request_id: str) -> None:
        await abort_quietly(self.fleet, request_id, log, "abort of %s after cancellation raised")

    # ------------------------------------------------------------------ adapters

    async def RegisterAdapter(
        self, request: pb.RegisterAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterAdapterResponse:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "adapter name is empty")
        if not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"adapter {request.name!r}: path is empty")
        await self._call(context, self.fleet.register_adapter, request.name, request.path)
        return pb.RegisterAdapterResponse()

    async def UnregisterAdapter(
        self, request: pb.UnregisterAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnregisterAdapterResponse:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "adapter name is empty")
        await self._call(context, self.fleet.unregister_adapter, request.name)
        return pb.UnregisterAdapterResponse()

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return convert.adapters_to_proto(await self._call(context, self.fleet.list_adapters))

    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        return convert.status_to_proto(await self._call(context, self.fleet.status), self.model)

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[..., Any], *args: Any) -> Any:
        if self.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        try:
            return fn(*args)
        except (FleetError, ValueError, KeyError) as exc:
            await context.abort(status_for(exc), _message(exc))


def _usage(tracker: RequestTracker, now: float) -> Usage:
    return Usage(
        prompt_tokens=tracker.prompt_tokens,
        generated_tokens=tracker.generated,
        time_to_first_token_s=tracker.ttft_s,
        total_time_s=now - tracker.arrival,
    )


async def _close(stream: AsyncIterator[TokenDelta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.debug("closing a fleet stream raised", exc_info=True)
