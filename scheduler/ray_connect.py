"""Start or join Ray for the fleet, within a bounded time and with an error that says what to do.

`ray.init()` with no address does not always start a new Ray: it first takes `RAY_ADDRESS`, then
the cluster `ray start` last recorded on this machine (`/tmp/ray/ray_current_cluster`), and when that
cluster is gone it retries for minutes with only warnings. `lorafleet serve` without
`--ray-address` promises its own local Ray, so that case passes `address="local"`, which Ray never
resolves from the environment. Joining ("auto" or HOST:PORT) first probes the address over TCP
(a refused or unroutable address fails in seconds), then runs `ray.init` in a daemon thread and
gives up after `timeout_s` (a port that accepts but never answers as Ray's GCS would hang forever,
and a rejected auth token makes Ray retry for about 25 s before it raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from lorafleet.scheduler.errors import FleetError

LOCAL = "local"
AUTO = "auto"
# Seconds the TCP probe of a HOST:PORT address may take; far below the whole connect bound.
PROBE_TIMEOUT_S = 5.0

AUTH_HINT = (
    "a cluster with token authentication needs RAY_AUTH_MODE=token here and the cluster's token "
    "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
)


class _DropThreadSigtermWarning(logging.Filter):
    # ray.init off the main thread warns that it left SIGTERM alone; that is what serve wants (its
    # event loop owns SIGTERM for the drain), so the warning would only mislead.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


logging.getLogger("ray._private.worker").addFilter(_DropThreadSigtermWarning())


class RayConnectError(FleetError):
    """Ray could not be started or joined; the message names the address and what to check."""


def ray_init_address(address: str | None) -> str:
    """What to pass to `ray.init`: None (no --ray-address) means a new local Ray, never a join."""
    return LOCAL if address is None else address


def split_host_port(address: str) -> tuple[str, int] | None:
    """'HOST:PORT' -> (HOST, PORT); None for "auto", "local" and ray:// client addresses."""
    if address in (AUTO, LOCAL) or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayConnectError(f"Ray address {address!r} must be 'auto' or HOST:PORT (e.g. 10.0.0.5:6379)")
    return host, int(port)


def probe_tcp(host: str, port: int, timeout_s: float) -> None:
    """RayConnectError unless something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__  # socket.timeout has no strerror
        raise RayConnectError(
            f"cannot reach the Ray cluster at {host}:{port}: {reason}; is `ray start --head` "
            f"running there and is the port (ray start --port) right?"
        ) from None


def _init_kwargs(address: str) -> dict[str, Any]:
    return {"address": address, "include_dashboard": False, "configure_logging": False}


async def connect_ray(address: str | None, timeout_s: float, **init_kwargs: Any) -> bool:
    """Start (address None) or join Ray; True when this process started it and must shut it down.

    Returns False without connecting when Ray is already initialised in this process (tests).
    Raises RayConnectError when a join does not complete within timeout_s, or ray.init fails.
    """
    import ray

    if ray.is_initialized():
        return False
    target = ray_init_address(address)
    kwargs = {**_init_kwargs(target), **init_kwargs}
    if target == LOCAL:
        # On this thread: Ray's processes get PR_SET_PDEATHSIG, which fires when the thread that
        # started them ends, so a local Ray started from a helper thread dies with that thread.
        try:
            ray.init(**kwargs)
        except Exception as exc:
            raise RayConnectError(
                f"could not start a local Ray: {_first_line(exc)}; see the Ray logs under "
                "/tmp/ray/session_latest/logs"
            ) from exc
        return True
    endpoint = split_host_port(target)
    if endpoint is not None:
        await asyncio.to_thread(probe_tcp, *endpoint, min(PROBE_TIMEOUT_S, timeout_s))
    await _join_within(target, kwargs, timeout_s)
    return True


def in_daemon_thread(fn: Callable[[], object], name: str) -> asyncio.Future[None]:
    """Run blocking ``fn`` on a daemon thread; the future (of the running loop) settles with its
    outcome. A call that never returns leaves only the thread behind, never the process."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as exc:  # handed to the waiting coroutine, which decides
            error = exc
        # After a timeout the waiter (and maybe its loop) is gone: nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done


async def _join_within(target: str, kwargs: dict[str, Any], timeout_s: float) -> None:
    import ray

    # A daemon thread, not the default executor: a ray.init stuck in Ray's C++ retry loop must not
    # keep the process alive after we give up on it. (A join starts no local Ray processes, so the
    # thread may end once connected.)
    done = in_daemon_thread(lambda: ray.init(**kwargs), "lorafleet-ray-init")
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except asyncio.TimeoutError:
        raise RayConnectError(
            f"could not join the Ray cluster at {target} within {timeout_s:g} s "
            f"(--ray-connect-timeout-s); check that it is a Ray head's GCS port (ray start --port); "
            f"{AUTH_HINT}"
        ) from None
    except Exception as exc:
        if _is_auth_error(exc):
            raise RayConnectError(
                f"the Ray cluster at {target} refused this process's token: {AUTH_HINT}; "
                "an explicit address never turns token auth on by itself, so set RAY_AUTH_MODE=token"
            ) from exc
        raise RayConnectError(f"could not join the Ray cluster at {target}: {_first_line(exc)}") from exc


def _is_auth_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
