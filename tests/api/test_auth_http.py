"""Auth on the HTTP side: every route of the OpenAI-compatible app (walked from `app.routes`)
refuses a request without a valid token with 401 and OpenAI's error body, the admin routes refuse
a client token with 403, and /metrics needs a token too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from lorafleet.serving.http_api import make_app

# Written out here, not taken from lorafleet.serving.auth, so that dropping one from the code fails a test.
ADMIN_PATHS = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


@pytest.fixture(scope="module")
def http(auth_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=auth_server["base"], timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
def routes(auth_server) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves."""
    app = make_app(auth_server["state"])
    found = [
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in sorted(route.methods or ())
        if method != "HEAD"
    ]
    assert {path for _, path in found} >= ADMIN_PATHS | {"/health", "/v1/models", "/v1/completions"}
    return found


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_refused(reply: httpx.Response, status: int, what: Any) -> None:
    assert reply.status_code == status, (what, reply.status_code, reply.text)
    error = reply.json()["error"]
    assert error["message"] and error["type"], what
    assert "token-0123456789" not in reply.text


def test_every_route_refuses_a_request_without_a_token(http, routes) -> None:
    for method, path in routes:
        reply = http.request(method, path, json={"model": "fake", "prompt": [1]})
        _assert_refused(reply, 401, (method, path))
        assert reply.headers["www-authenticate"] == "Bearer"
    _assert_refused(http.get("/no/such/path"), 401, "unknown path")


def test_every_route_refuses_a_wrong_token_or_scheme(http, routes, auth_server) -> None:
    for method, path in routes:
        for header in ("Bearer not-a-valid-token-at-all", f"Basic {auth_server['admin']}", "Bearer"):
            reply = http.request(method, path, headers={"Authorization": header})
            _assert_refused(reply, 401, (method, path, header))


def test_admin_routes_refuse_a_client_token_and_the_rest_accept_it(http, routes, auth_server) -> None:
    client = _bearer(auth_server["client"])
    for method, path in routes:
        reply = http.request(method, path, headers=client, json={})
        if path in ADMIN_PATHS:
            _assert_refused(reply, 403, (method, path))
        else:
            assert reply.status_code not in (401, 403), (method, path, reply.text)
    admin = _bearer(auth_server["admin"])
    body = {"lora_name": "carol", "lora_path": "/adapters/carol"}
    assert http.post("/v1/load_lora_adapter", headers=admin, json=body).status_code == 200
    assert http.post("/v1/unload_lora_adapter", headers=admin, json={"lora_name": "carol"}).status_code == 200


def test_a_client_token_generates(http, auth_server) -> None:
    reply = http.post(
        "/v1/completions",
        headers=_bearer(auth_server["client"]),
        json={"model": "alice", "prompt": [5, 6], "max_tokens": 3},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3


def test_metrics_need_a_token(auth_server) -> None:
    url = f"http://127.0.0.1:{auth_server['api'].metrics_port}/metrics"
    refused = httpx.get(url, timeout=10)
    assert refused.status_code == 401
    assert "lorafleet_" not in refused.text
    wrong = httpx.get(url, headers=_bearer("not-a-valid-token-at-all"), timeout=10)
    assert wrong.status_code == 401
    ok = httpx.get(url, headers=_bearer(auth_server["client"]), timeout=10)
    assert ok.status_code == 200
    assert "lorafleet_requests_total" in ok.text


def test_without_keys_everything_stays_open(fake_http_server) -> None:
    base = fake_http_server["base"]
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 200
    metrics = f"http://127.0.0.1:{fake_http_server['api'].metrics_port}/metrics"
    assert httpx.get(metrics, timeout=10).status_code == 200
