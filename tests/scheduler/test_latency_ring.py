"""LatencyRing: the head's fixed-size buffer of recent delivery latencies."""

from __future__ import annotations

import pytest

from lorafleet.scheduler.latency_ring import LatencyRing


def test_keeps_the_most_recent_samples_oldest_first() -> None:
    ring = LatencyRing(3)
    assert (len(ring), list(ring), ring.capacity) == (0, [], 3)
    with pytest.raises(IndexError, match="empty"):
        ring.latest()
    ring.append(0.5)
    ring.append(1.5)
    assert list(ring) == [0.5, 1.5] and ring.latest() == 1.5
    for value in (2.5, 3.5, 4.5):
        ring.append(value)
    assert (len(ring), list(ring), sorted(ring)) == (3, [2.5, 3.5, 4.5], [2.5, 3.5, 4.5])
    assert ring.latest() == 4.5  # after wrapping around
    ring.clear()
    assert (len(ring), list(ring)) == (0, [])
    ring.append(9.0)
    assert list(ring) == [9.0]


@pytest.mark.parametrize("capacity", [0, -1, 2.5, True, "8"])
def test_refuses_a_bad_capacity(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        LatencyRing(capacity)  # type: ignore[arg-type]
