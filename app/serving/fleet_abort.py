"""Aborting a fleet request whose API call ended early, shared by the gRPC and the HTTP API."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

# An abort only frees KV blocks; a fleet that does not answer by then must not hold up the caller.
ABORT_TIMEOUT_S = 10.0


class SupportsAbort(Protocol):
    """The part of `lorafleet.scheduler.fleet.Fleet` an abort needs."""

    async def abort(self, request_id: str) -> None: ...


async def abort_quietly(fleet: SupportsAbort, request_id: str, log: logging.Logger, failure: str) -> None:
    """Abort `request_id` on `fleet`, waiting at most ABORT_TIMEOUT_S; never raises an Exception.

    The abort is shielded, so it still reaches the fleet when the caller's task is being cancelled.
    A failure (the request may already be gone; the fleet logs its own failures) is logged to `log`
    at debug level as `failure % request_id`.
    """
    try:
        await asyncio.wait_for(asyncio.shield(fleet.abort(request_id)), ABORT_TIMEOUT_S)
    except Exception:
        log.debug(failure, request_id, exc_info=True)
