"""Errors the fleet raises to its callers (the gRPC layer maps each one to a status code)."""

from __future__ import annotations


class FleetError(Exception):
    """Base class of every error `Fleet` raises on purpose."""


class UnknownAdapterError(FleetError, KeyError):
    """The request names an adapter that is not registered (gRPC NOT_FOUND)."""

    def __str__(self) -> str:
        # KeyError.__str__ quotes its argument; callers show this message to users as is.
        return str(self.args[0]) if self.args else "unknown adapter"


class InvalidRequestError(FleetError, ValueError):
    """The request or one of its parameters is invalid (gRPC INVALID_ARGUMENT)."""


class AdapterInUseError(FleetError):
    """Re-pointing an adapter name that unfinished requests use (gRPC FAILED_PRECONDITION): they
    would finish on one version while new requests got another."""


class QueueFullError(FleetError):
    """The bounded request queue is full (gRPC RESOURCE_EXHAUSTED)."""


class ShuttingDownError(FleetError):
    """The fleet is shutting down or not started (gRPC UNAVAILABLE)."""


class ClusterLostError(ShuttingDownError):
    """The fleet lost its Ray cluster (the GCS stopped answering): every admitted request fails and
    new ones are refused with gRPC UNAVAILABLE (HTTP 503), and `lorafleet serve` exits 1."""


class RequestFailedError(FleetError):
    """An admitted request could not be completed; the message says why (gRPC INTERNAL/ABORTED)."""

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"request {request_id} failed: {reason}")
        self.request_id = request_id
        self.reason = reason


def short_reason(exc: BaseException) -> str:
    """One line naming an exception and its cause (for logs, statuses and failed requests)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray wraps the actor's traceback around the cause; the last line names the cause.
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
