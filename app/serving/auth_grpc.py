"""The gRPC side of authentication: one server interceptor in front of every service.

It sees every method the server has (LoraFleet, grpc.health.v1, reflection), so a new RPC is
covered without being listed. A missing or wrong `authorization: Bearer <token>` gets
UNAUTHENTICATED; a client token on an admin method gets PERMISSION_DENIED. The refusal is a
handler of the same kind (unary/stream) as the real one, which grpc requires, and it takes the
request as raw bytes, so nothing an unauthenticated caller sends is even parsed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from lorafleet.serving.auth import ADMIN_GRPC_METHODS, ApiKeys, allowed

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token (send `authorization: Bearer <token>`)"
FORBIDDEN_MESSAGE = "this call needs an admin token"


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item_key, value in metadata or ():
        if item_key == key:
            return value if isinstance(value, str) else None
    return None


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    # Same serializer as the real handler (only errors go out), no deserializer (bytes stay bytes).
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED, which reveals nothing
            return handler
        header = _metadata_value(handler_call_details.invocation_metadata, "authorization")
        role = self.keys.role_of_header(header)
        if role is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        if not allowed(role, handler_call_details.method in ADMIN_GRPC_METHODS):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, FORBIDDEN_MESSAGE)
        return handler
