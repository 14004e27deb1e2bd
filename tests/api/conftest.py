"""Shared fixtures of the API tests: an event loop in a thread and a fake fleet behind a real server.

The fake fleet honours the Fleet contract (errors, ABORT on abort, blocks freed at the end) with
deterministic tokens, so the servicer's conversion, error mapping, cancellation and metrics are
tested in a second, without Ray or a model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import pytest

from lorafleet.scheduler.errors import (
    AdapterInUseError,
    QueueFullError,
    RequestFailedError,
    ShuttingDownError,
    UnknownAdapterError,
)
from lorafleet.scheduler.status import ClusterStatus, FleetCounters, WorkerStatus
from lorafleet.serving.api_types import ModelView
from lorafleet.worker.types import FinishReason, Request, TokenDelta

VOCAB = 384
MAX_CONTEXT = 64


class LoopThread:
    """An asyncio loop running in a daemon thread, so blocking clients can call its servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def fake_token(request: Request, index: int) -> int:
    salt = sum(map(ord, request.adapter or ""))
    return (sum(request.prompt_token_ids) + 7 * index + salt) % VOCAB


class FakeFleet:
    """Admits up to max_running requests; each holds blocks until it finishes or is aborted."""

    def __init__(self, *, max_running: int = 4, token_delay_s: float = 0.005, total_blocks: int = 64) -> None:
        self.adapters: dict[str, str] = {"alice": "/adapters/alice", "bob": "/adapters/bob"}
        self.max_running = max_running
        self.token_delay_s = token_delay_s
        self.total_blocks = total_blocks
        self.held: dict[str, int] = {}
        self.abort_requested: set[str] = set()
        self.aborted: list[str] = []
        self.closing = False
        self.completed = 0
        self.migrations = 0
        self.load_count = 0
        self.recent_loads: list[float] = []
        self.queue_wait_s = 0.0  # seconds an admitted request waits before its first token

    async def generate(self, request: Request) -> AsyncIterator[TokenDelta]:
        if self.closing:
            raise ShuttingDownError("the fleet is shutting down")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {request.adapter!r}")
        if len(self.held) >= self.max_running:
            raise QueueFullError(f"the request queue is full ({self.max_running} requests)")
        if request.adapter == "bob" and request.prompt_token_ids[0] == 13:
            raise RequestFailedError(request.request_id, "worker died twice")
        rid = request.request_id
        self.held[rid] = 1 + len(request.prompt_token_ids) // 4
        if request.adapter is not None:
            self.load_count += 1
            self.recent_loads.append(0.002 * self.load_count)
        try:
            if self.queue_wait_s:
                await asyncio.sleep(self.queue_wait_s)
            n = request.sampling.max_new_tokens
            for i in range(n):
                await asyncio.sleep(self.token_delay_s)
                if rid in self.abort_requested:
                    self.aborted.append(rid)
                    yield TokenDelta(rid, (), finish_reason=FinishReason.ABORT)
                    return
                if request.adapter == "bob" and request.prompt_token_ids[0] == 77 and i == 2:
                    self.aborted.append(rid)  # the server gives up on the stream (e.g. draining)
                    yield TokenDelta(rid, (), finish_reason=FinishReason.ABORT)
                    return
                if request.adapter == "bob" and request.prompt_token_ids[0] == 66 and i == 2:
                    yield TokenDelta(rid, (), finish_reason=FinishReason.ERROR, error="CUDA out of memory")
                    return
                tok = fake_token(request, i)
                last = i == n - 1
                yield TokenDelta(
                    rid,
                    (tok,),
                    new_text=f"<{tok}>",
                    finish_reason=FinishReason.LENGTH if last else None,
                    num_prompt_tokens=len(request.prompt_token_ids),
                )
            self.completed += 1
        finally:
            self.held.pop(rid, None)

    @staticmethod
    def expected_tokens(prompt: list[int], adapter: str | None, n: int) -> tuple[int, ...]:
        req = Request("x", tuple(prompt), adapter)
        return tuple(fake_token(req, i) for i in range(n))

    async def abort(self, request_id: str) -> None:
        self.abort_requested.add(request_id)
        self.held.pop(request_id, None)

    def register_adapter(self, name: str, path: str) -> None:
        if not path.startswith("/adapters/"):
            raise ValueError(f"{path}: no adapter_config.json")
        if name in self.adapters and self.adapters[name] != path and name.startswith("busy"):
            raise AdapterInUseError(f"adapter {name!r} is in use by 1 unfinished request(s)")
        self.adapters[name] = path

    def unregister_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        del self.adapters[name]

    def list_adapters(self) -> dict[str, str]:
        return dict(self.adapters)

    def status(self) -> ClusterStatus:
        used = sum(self.held.values())
        worker = WorkerStatus(
            worker_id="w0",
            state="active",
            num_running=len(self.held),
            max_batch_size=self.max_running,
            free_kv_blocks=self.total_blocks - used,
            total_kv_blocks=self.total_blocks,
            resident_adapters=tuple(sorted(self.adapters)),
        )
        counters = FleetCounters(
            requests_completed=self.completed,
            migrations=self.migrations,
            adapter_load_count=self.load_count,
            adapter_loads=self.load_count,
            adapter_load_seconds_sum=sum(self.recent_loads),
        )
        return ClusterStatus(
            (worker,),
            queue_len=0,
            counters=counters,
            recent_adapter_load_seconds=tuple(self.recent_loads[-1024:]),
        )

    async def shutdown(self, drain: bool = True) -> None:
        self.closing = True


def fake_encode(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text]


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def _serve_fake(
    loop_thread: LoopThread, metrics_port: int | None
) -> Iterator[tuple[Any, FakeFleet, LoopThread]]:
    from lorafleet.serving.serve import start_api

    fleet = FakeFleet()
    model = ModelView(name="fake", vocab_size=VOCAB, max_context_tokens=MAX_CONTEXT)
    api = loop_thread.run(
        start_api(fleet, model=model, encode=fake_encode, host="127.0.0.1", port=0, metrics_port=metrics_port)
    )
    yield api, fleet, loop_thread
    loop_thread.run(api.stop(grace_s=0.1))


@pytest.fixture
def fake_server(loop_thread: LoopThread) -> Iterator[tuple[Any, FakeFleet, LoopThread]]:
    """(api, fleet, loop thread): a gRPC server on a free port over a FakeFleet, no /metrics."""
    yield from _serve_fake(loop_thread, None)


@pytest.fixture
def fake_server_with_metrics(loop_thread: LoopThread) -> Iterator[tuple[Any, FakeFleet, LoopThread]]:
    """As fake_server, plus /metrics on a free port (api.metrics_port)."""
    yield from _serve_fake(loop_thread, 0)


class FakeCodec:
    """Text <-> ids as the fake fleet writes them: token t decodes to "<t>"."""

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return fake_encode(text)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in ids)


@pytest.fixture(scope="module")
def fake_http_server() -> Iterator[dict[str, Any]]:
    """One gRPC + OpenAI HTTP server (same loop) over a FakeFleet with the demo chat template, per
    module: {"api", "fleet", "lt", "base" (the HTTP base URL)}; /metrics on api.metrics_port."""
    from lorafleet.serving.chat_template import ChatTemplate
    from lorafleet.serving.http_api import HttpState
    from lorafleet.serving.serve import start_api
    from lorafleet.worker.demo_assets import DEMO_CHAT_TEMPLATE

    lt = LoopThread()
    fleet = FakeFleet()
    model = ModelView(name="fake", vocab_size=VOCAB, max_context_tokens=MAX_CONTEXT)
    state = HttpState(
        fleet=fleet,
        model=model,
        model_root="/models/fake",
        codec=FakeCodec(),
        chat_template=ChatTemplate(DEMO_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>"),
    )
    api = lt.run(
        start_api(fleet, model=model, encode=fake_encode, port=0, metrics_port=0, http_port=0, http=state)
    )
    yield {"api": api, "fleet": fleet, "lt": lt, "base": f"http://127.0.0.1:{api.http_port}"}
    lt.run(api.stop(grace_s=0.1))
    lt.close()


# Tokens of the auth fixtures (auth.MIN_TOKEN_CHARS long or more).
CLIENT_TOKEN = "client-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789ab"


@pytest.fixture(scope="module")
def auth_server() -> Iterator[dict[str, Any]]:
    """gRPC + HTTP + /metrics over a FakeFleet with auth on (one client and one admin token), per
    module: {"api", "fleet", "lt", "state", "base" (HTTP base URL), "client", "admin" (tokens)}."""
    from lorafleet.serving.auth import parse_keys
    from lorafleet.serving.http_api import HttpState
    from lorafleet.serving.serve import start_api

    keys = parse_keys([f"client {CLIENT_TOKEN}", f"admin {ADMIN_TOKEN}"], "test")
    lt = LoopThread()
    fleet = FakeFleet()
    model = ModelView(name="fake", vocab_size=VOCAB, max_context_tokens=MAX_CONTEXT)
    state = HttpState(
        fleet=fleet, model=model, model_root="/models/fake", codec=FakeCodec(), chat_template=None
    )
    api = lt.run(
        start_api(
            fleet, model=model, encode=fake_encode, port=0, metrics_port=0, http_port=0, http=state, keys=keys
        )
    )
    yield {
        "api": api,
        "fleet": fleet,
        "lt": lt,
        "state": state,
        "base": f"http://127.0.0.1:{api.http_port}",
        "client": CLIENT_TOKEN,
        "admin": ADMIN_TOKEN,
    }
    lt.run(api.stop(grace_s=0.1))
    lt.close()
