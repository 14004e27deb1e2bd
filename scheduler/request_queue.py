"""The one FCFS queue of requests waiting for a worker."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from lorafleet.scheduler.policy_types import PendingRequest


class RequestQueue:
    """First come, first served, with O(1) removal (aborts) and front insertion (resumed requests).

    Requests put back after an eviction or a worker fault go to the front: they were admitted before
    anything still waiting, so FCFS order puts them first.
    """

    def __init__(self) -> None:
        self._items: OrderedDict[str, PendingRequest] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._items

    def __iter__(self) -> Iterator[PendingRequest]:
        return iter(self._items.values())

    def push(self, request: PendingRequest) -> None:
        if request.request_id in self._items:
            raise ValueError(f"request {request.request_id} is already queued")
        self._items[request.request_id] = request

    def push_front(self, request: PendingRequest) -> None:
        self.push(request)
        self._items.move_to_end(request.request_id, last=False)

    def peek(self) -> PendingRequest | None:
        if not self._items:
            return None
        return next(iter(self._items.values()))

    def pop(self) -> PendingRequest:
        if not self._items:
            raise IndexError("pop from an empty request queue")
        return self._items.popitem(last=False)[1]

    def remove(self, request_id: str) -> PendingRequest | None:
        return self._items.pop(request_id, None)
