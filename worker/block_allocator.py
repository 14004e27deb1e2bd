"""Fixed-size KV-cache block bookkeeping (host side only; the KV tensors live in kv_cache.py)."""

from __future__ import annotations


class KVBlockAllocator:
    """Hands out physical block ids ``0 .. num_blocks-1``; a block belongs to one sequence at a time."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end: low ids first, so a small workload touches a compact region.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._in_use)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks; raises RuntimeError (allocating nothing) when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: {n} requested, {len(self._free)} free")
        taken = [self._free.pop() for _ in range(n)]
        self._in_use.update(taken)
        return taken

    def free(self, blocks: list[int]) -> None:
        """Return blocks; a block not currently allocated is an error (double free)."""
        bad = [b for b in blocks if b not in self._in_use]
        if bad or len(set(blocks)) != len(blocks):
            raise ValueError(f"freeing KV block {bad[0] if bad else blocks} that is not allocated")
        for b in reversed(blocks):
            self._in_use.discard(b)
            self._free.append(b)
