"""ray_connect: which address reaches ray.init, and every failure a RayConnectError in bounded time.

ray.init is replaced by fakes here (the real joins run in tests/cli/test_serve_ray_address.py).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest

from lorafleet.scheduler.errors import FleetError
from lorafleet.scheduler.ray_connect import RayConnectError, connect_ray, split_host_port

ray = pytest.importorskip("ray")


class FakeInit:
    def __init__(self, behaviour: str = "ok") -> None:
        self.behaviour = behaviour
        self.calls: list[dict[str, Any]] = []
        self.threads: list[threading.Thread] = []
        self.release = threading.Event()

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        self.threads.append(threading.current_thread())
        if self.behaviour == "hang":
            self.release.wait(30)
        elif self.behaviour == "auth":
            try:
                raise ConnectionError("RPC error: InvalidAuthToken: Authentication token is missing")
            except ConnectionError as exc:
                raise RuntimeError("Failed to connect to GCS. Last connection error: ...") from exc
        elif self.behaviour == "fail":
            raise ConnectionError("Could not find any running Ray instance.\nmore detail")


@pytest.fixture
def fake_init(monkeypatch: pytest.MonkeyPatch) -> FakeInit:
    fake = FakeInit()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake)
    yield fake
    fake.release.set()


@pytest.fixture
def listening_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        yield listener.getsockname()[1]


def test_no_address_always_starts_a_local_ray_on_this_thread(
    fake_init: FakeInit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RAY_ADDRESS (or a cluster recorded by `ray start`) is what ray.init() would join; "local" never.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert asyncio.run(connect_ray(None, 5)) is True
    assert fake_init.calls[0]["address"] == "local"
    assert fake_init.threads == [threading.main_thread()]  # Ray's processes die with their thread


def test_already_initialised_ray_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init must not be called"))
    assert asyncio.run(connect_ray("10.0.0.1:6379", 5)) is False


def test_join_passes_the_address_and_runs_off_the_event_loop(
    fake_init: FakeInit, listening_port: int
) -> None:
    address = f"127.0.0.1:{listening_port}"
    assert asyncio.run(connect_ray(address, 5)) is True
    assert fake_init.calls[0]["address"] == address
    assert fake_init.threads[0] is not threading.main_thread()


def test_hanging_join_gives_up_after_the_bound(fake_init: FakeInit, listening_port: int) -> None:
    fake_init.behaviour = "hang"
    started = time.monotonic()
    with pytest.raises(RayConnectError, match=r"within 0.5 s \(--ray-connect-timeout-s\)"):
        asyncio.run(connect_ray(f"127.0.0.1:{listening_port}", 0.5))
    assert time.monotonic() - started < 5


def test_refused_address_fails_before_ray_init(fake_init: FakeInit) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RayConnectError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        asyncio.run(connect_ray(f"127.0.0.1:{port}", 5))
    assert fake_init.calls == []


def test_rejected_token_names_the_auth_settings(fake_init: FakeInit, listening_port: int) -> None:
    fake_init.behaviour = "auth"
    with pytest.raises(RayConnectError, match=r"refused this process's token.*RAY_AUTH_MODE=token"):
        asyncio.run(connect_ray(f"127.0.0.1:{listening_port}", 5))


def test_auto_without_a_cluster_is_one_clear_line(fake_init: FakeInit) -> None:
    fake_init.behaviour = "fail"
    with pytest.raises(RayConnectError) as info:
        asyncio.run(connect_ray("auto", 5))
    assert (
        str(info.value) == "could not join the Ray cluster at auto: Could not find any running Ray instance."
    )
    assert isinstance(info.value, FleetError)  # the CLI prints FleetErrors as `lorafleet: error: ...`


def test_failed_local_start_is_a_ray_connect_error(fake_init: FakeInit) -> None:
    fake_init.behaviour = "fail"
    with pytest.raises(RayConnectError, match="could not start a local Ray"):
        asyncio.run(connect_ray(None, 5))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
        ("local", None),
        ("ray://head:10001", None),
    ],
)
def test_split_host_port(address: str, expected: tuple[str, int] | None) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["head", "head:", ":6379", "head:port", "head:70000", "head:0"])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(RayConnectError, match="must be 'auto' or HOST:PORT"):
        split_host_port(address)
