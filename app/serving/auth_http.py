"""The HTTP side of authentication: an ASGI middleware for the OpenAI-compatible API and a WSGI
wrapper for /metrics.

The middleware sits in front of the whole FastAPI app, so every path (including /health, /v1/models
and paths that do not exist) needs a token; a refusal is OpenAI's error body with 401 (no or
wrong token) or 403 (a client token on an admin path), and the request body is never read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from lorafleet.serving import openai_types as oai
from lorafleet.serving.auth import ADMIN_HTTP_PATHS, ApiKeys, allowed

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token (send `Authorization: Bearer <token>`)"
FORBIDDEN_MESSAGE = "this endpoint needs an admin token"


def _refusal_body(status: int) -> bytes:
    if status == 401:
        body = oai.error_body(UNAUTHENTICATED_MESSAGE, "invalid_request_error", None, "invalid_api_key")
    else:
        body = oai.error_body(FORBIDDEN_MESSAGE, "permission_error", None, "insufficient_permissions")
    return json.dumps(body).encode()


class BearerAuthMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan carries no request
            await self.app(scope, receive, send)
            return
        header = None
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        role = self.keys.role_of_header(header)
        status = 401 if role is None else 0
        if role is not None and not allowed(role, scope.get("path", "") in ADMIN_HTTP_PATHS):
            status = 403
        if not status:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = _refusal_body(status)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def bearer_wsgi(app: WsgiApp, keys: ApiKeys) -> WsgiApp:
    """`app` (prometheus_client's /metrics) behind a bearer token of any role."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if keys.role_of_header(environ.get("HTTP_AUTHORIZATION")) is not None:
            return app(environ, start_response)
        body = _refusal_body(401)
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("WWW-Authenticate", "Bearer"),
            ],
        )
        return [body]

    return guarded
