"""Requests that are not valid protobuf get INVALID_ARGUMENT, not grpc's UNKNOWN.

grpc decodes a request before any handler runs, and a decode failure (garbage bytes, invalid UTF-8
in a string field) reaches the caller as `UNKNOWN: Unexpected <class ...DecodeError>`. This
interceptor hands each unary-request handler the raw bytes instead and decodes them itself, so the
caller hears what is wrong with their request.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc


def _decoding(behavior: Any, deserialize: Callable[[bytes], Any], streaming: bool) -> Any:
    async def decode(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # protobuf's DecodeError, or a UnicodeDecodeError under it
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid protobuf message for this method ({type(exc).__name__})",
            )

    if not streaming:

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await decode(raw, context), context)

        return unary
    if inspect.isasyncgenfunction(behavior):

        async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            async for response in behavior(await decode(raw, context), context):
                yield response

        return stream

    async def written(raw: bytes, context: grpc.aio.ServicerContext) -> Any:  # writes via context.write
        return await behavior(await decode(raw, context), context)

    return written


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # client-streaming methods (reflection) decode as grpc does
        deserialize = handler.request_deserializer
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _decoding(handler.unary_stream, deserialize, True),
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _decoding(handler.unary_unary, deserialize, False),
            response_serializer=handler.response_serializer,
        )
