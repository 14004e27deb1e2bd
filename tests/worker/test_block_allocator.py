"""KV block bookkeeping."""

from __future__ import annotations

import pytest

from lorafleet.worker.block_allocator import KVBlockAllocator


def test_allocate_free_and_counts() -> None:
    alloc = KVBlockAllocator(4, block_size=16)
    assert alloc.blocks_needed(0) == 0 and alloc.blocks_needed(16) == 1 and alloc.blocks_needed(17) == 2
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 1 and alloc.num_used == 3
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed allocation takes nothing
    alloc.free(a[:2])
    assert alloc.num_free == 3 and alloc.can_allocate(3) and not alloc.can_allocate(4)
    b = alloc.allocate(3)
    assert set(b).isdisjoint({a[2]})
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([a[2], a[2]])
    alloc.free(b)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(b[:1])


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        KVBlockAllocator(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        KVBlockAllocator(4, 0)
