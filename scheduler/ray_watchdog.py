"""Watch the head's connection to Ray's GCS, and say when it is lost, within a bounded time.

Without its GCS a Ray cluster cannot start or kill actors or report their deaths, so calls to a
dead worker may wait forever; and Ray's own client ends the whole process with a bare `_exit(1)`
once the GCS has been unreachable for `gcs_rpc_server_reconnect_timeout_s` (60 s by default). The
watchdog probes the GCS every `interval_s` from a thread of its own (a probe that hangs never blocks
the event loop, and never piles up threads) and calls `on_lost` once no probe has succeeded for
`lost_after_s`; the fleet then fails what it holds with UNAVAILABLE and the server exits with a
clear message instead of hanging or vanishing. A probe that succeeds again in time resets the clock
(a short network blip is survived).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from lorafleet.scheduler.errors import short_reason
from lorafleet.scheduler.ray_connect import in_daemon_thread

log = logging.getLogger("lorafleet.scheduler")


def gcs_probe(address: str, timeout_s: float) -> Callable[[], None]:
    """A probe of the GCS at HOST:PORT: a TCP connect (a killed GCS refuses at once), then a bounded
    read from its key-value store (a GCS that accepts but no longer answers fails that)."""
    host, _, port = address.rpartition(":")
    endpoint = (host.strip("[]"), int(port))

    def probe() -> None:
        with socket.create_connection(endpoint, timeout=timeout_s):
            pass
        client = _gcs_client()
        if client is not None:
            client.internal_kv_exists(b"lorafleet-watchdog", b"lorafleet", timeout=timeout_s)

    return probe


def _gcs_client() -> Any:
    # Ray's own connected client, when this Ray version exposes it; the TCP probe alone still
    # catches a GCS that is gone.
    import ray

    worker = getattr(ray._private.worker, "global_worker", None)
    client = getattr(worker, "gcs_client", None)
    return client if hasattr(client, "internal_kv_exists") else None


class RayWatchdog:
    def __init__(
        self,
        probe: Callable[[], None],
        on_lost: Callable[[str], None],
        *,
        interval_s: float,
        lost_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0 or not lost_after_s > 0:
            raise ValueError(f"interval_s and lost_after_s must be > 0, got {interval_s}, {lost_after_s}")
        self._probe = probe
        self._on_lost = on_lost
        self.interval_s = interval_s
        self.lost_after_s = lost_after_s
        self._clock = clock
        self.last_ok = clock()
        self.last_error: str | None = None
        self._running: asyncio.Future[None] | None = None  # the probe in flight, if any

    def _start_probe(self) -> asyncio.Future[None]:
        return in_daemon_thread(self._probe, "lorafleet-ray-watchdog")

    async def check(self) -> bool:
        """One probe, bounded by `interval_s`; True while the GCS counts as reachable."""
        if self._running is None or self._running.done():
            self._running = self._start_probe()
        try:
            await asyncio.wait_for(asyncio.shield(self._running), self.interval_s)
        except asyncio.TimeoutError:
            self.last_error = f"no answer within {self.interval_s:g} s"
        except Exception as exc:
            self.last_error = short_reason(exc)
        else:
            if self.last_error is not None:
                log.warning("the Ray GCS answers again")
            self.last_ok, self.last_error = self._clock(), None
            return True
        silent = self._clock() - self.last_ok
        log.warning("the Ray GCS did not answer for %.1f s: %s", silent, self.last_error)
        return silent < self.lost_after_s

    async def run(self) -> None:
        """Probe until the GCS counts as lost, then call `on_lost` once with the reason."""
        while True:
            started = self._clock()
            if not await self.check():
                self._on_lost(
                    f"the Ray cluster's GCS did not answer for {self._clock() - self.last_ok:.0f} s "
                    f"(last error: {self.last_error})"
                )
                return
            await asyncio.sleep(max(0.0, self.interval_s - (self._clock() - started)))
