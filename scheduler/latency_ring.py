"""A fixed-size ring of recent float samples, allocated once.

The head records one delivery latency per token batch it hands to a caller. A `deque(maxlen=N)` of
Python floats grows by ~32 bytes a sample until it holds N (3.2 MB for 100,000: in a soak that looks
like a leak for the first minutes); this ring takes 8 bytes a sample, all of it up front.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator


class LatencyRing:
    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self._values = array("d", bytes(8 * capacity))
        self._next = 0  # slot the next sample goes to
        self._size = 0

    @property
    def capacity(self) -> int:
        return len(self._values)

    def append(self, value: float) -> None:
        self._values[self._next] = value
        self._next = (self._next + 1) % len(self._values)
        self._size = min(self._size + 1, len(self._values))

    def latest(self) -> float:
        """The newest sample (IndexError when empty): what the last delivery took."""
        if not self._size:
            raise IndexError("the ring is empty")
        return self._values[(self._next - 1) % len(self._values)]

    def clear(self) -> None:
        self._next = self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[float]:
        """Oldest first."""
        start = (self._next - self._size) % len(self._values)
        for i in range(self._size):
            yield self._values[(start + i) % len(self._values)]
