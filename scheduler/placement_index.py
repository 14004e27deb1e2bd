"""A working copy of the fleet's placeable workers, indexed so one placement costs ~O(log W).

Workers are bucketed by current batch size (and block size, which fixes how many blocks a prompt
needs); inside a bucket they are kept sorted by free KV blocks. The packing rule then walks the
buckets from the largest batch down and, in each, bisects to the first worker with enough free
blocks: every worker after it in the bucket is feasible too. Placing a request updates the copy, so a
planning pass sees its own earlier decisions.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable

from lorafleet.scheduler.policy_types import WorkerSnapshot, WorkerState, blocks_for

_WALK_FIRST = 32  # entries `_first_resident` walks before it scans an adapter's holders instead


class WorkerSlot:
    """Mutable planning copy of one active worker."""

    __slots__ = ("batch", "block_size", "free", "max_batch", "order", "resident", "total", "worker_id")

    def __init__(self, order: int, snap: WorkerSnapshot) -> None:
        self.order = order
        self.worker_id = snap.worker_id
        self.load(snap)

    def load(self, snap: WorkerSnapshot) -> None:
        self.batch = snap.num_running
        self.max_batch = snap.max_batch_size
        self.free = snap.free_kv_blocks
        self.total = snap.total_kv_blocks
        self.block_size = snap.block_size
        self.resident: frozenset[str] | set[str] = snap.resident_adapters  # copied on first write

    def need(self, prompt_len: int) -> int:
        """KV blocks the rule asks for: the prompt's plus one spare block per running sequence."""
        return blocks_for(prompt_len, self.block_size) + self.batch

    def feasible(self, prompt_len: int, below: int | None = None) -> bool:
        """Room for the prompt; with `below`, also a batch below it (a placement batch target)."""
        if below is not None and self.batch >= below:
            return False
        return self.batch < self.max_batch and self.free >= self.need(prompt_len)


class PlacementIndex:
    def __init__(self, workers: Iterable[WorkerSnapshot]) -> None:
        self.slots: list[WorkerSlot] = []
        self.by_id: dict[str, WorkerSlot] = {}
        # batch size -> block size -> sorted [(free blocks, order)] of workers below their max batch
        self._levels: dict[int, dict[int, list[tuple[int, int]]]] = {}
        self._level_keys: list[int] = []  # non-empty batch sizes, ascending
        self._resident: dict[str, set[int]] = {}  # adapter -> orders of workers holding it
        for snap in workers:
            if snap.state is not WorkerState.ACTIVE:
                continue
            if snap.block_size < 1 or snap.max_batch_size < 1:
                raise ValueError(f"worker {snap.worker_id}: block_size and max_batch_size must be >= 1")
            slot = WorkerSlot(len(self.slots), snap)
            self.slots.append(slot)
            self.by_id[slot.worker_id] = slot
            for adapter in slot.resident:
                self._resident.setdefault(adapter, set()).add(slot.order)
        for slot in self.slots:
            if slot.batch < slot.max_batch:
                self._levels.setdefault(slot.batch, {}).setdefault(slot.block_size, []).append(
                    (slot.free, slot.order)
                )
        for groups in self._levels.values():
            for entries in groups.values():
                entries.sort()
        self._level_keys = sorted(self._levels)
        self.max_total_blocks = max((s.total for s in self.slots), default=0)

    # ------------------------------------------------------------ queries

    def best_packing(
        self,
        adapter: str | None,
        prompt_len: int,
        *,
        min_batch: int = 0,
        exclude: WorkerSlot | None = None,
        below: int | None = None,
    ) -> WorkerSlot | None:
        """Largest batch among feasible workers; ties: adapter resident, then fewer free blocks.
        Workers whose batch is below `min_batch` are not considered, nor `exclude` (consolidation's
        targets: at least as busy as the source, never the source itself), nor, with `below`, those
        whose batch has reached it (a placement batch target under the engine's limit)."""
        holders = self._resident.get(adapter) if adapter is not None else None
        skip = exclude.order if exclude is not None else -1
        keys = self._level_keys
        top = len(keys) if below is None else bisect_left(keys, below)
        for k in range(top - 1, -1, -1):
            batch = keys[k]
            if batch < min_batch:
                break
            best: tuple[int, int, int] | None = None  # (not resident, free, order)
            for block_size, entries in self._levels[batch].items():
                need = blocks_for(prompt_len, block_size) + batch
                i = bisect_left(entries, (need, -1))
                if i < len(entries) and entries[i][1] == skip:
                    i += 1
                if i == len(entries):
                    continue
                key = (1, *entries[i])
                if holders:
                    resident = self._first_resident(holders, entries, i, batch, block_size, need, skip)
                    if resident is not None:
                        key = (0, *resident)
                if best is None or key < best:
                    best = key
            if best is not None:
                return self.slots[best[2]]
        return None

    def _first_resident(
        self,
        holders: set[int],
        entries: list[tuple[int, int]],
        start: int,
        batch: int,
        block_size: int,
        need: int,
        skip: int,
    ) -> tuple[int, int] | None:
        # The bucket's feasible tail is sorted, so its first holder is the answer: walk it when it is
        # the shorter list. Else scan the holders, but for a popular adapter (hundreds of holders
        # fleet-wide, many in this bucket) walk a few steps first: one is usually met at once.
        end = len(entries)
        if end - start > len(holders):
            end = start + _WALK_FIRST if len(holders) > _WALK_FIRST else start
            end = min(end, len(entries))
        for j in range(start, end):
            if entries[j][1] in holders and entries[j][1] != skip:
                return entries[j]
        if end == len(entries):
            return None
        best: tuple[int, int] | None = None
        for order in holders:
            s = self.slots[order]
            if order == skip:
                continue
            if s.batch == batch and s.batch < s.max_batch and s.block_size == block_size and s.free >= need:
                key = (s.free, order)
                if best is None or key < best:
                    best = key
        return best

    def least_loaded(self, prompt_len: int, *, below: int | None = None) -> WorkerSlot | None:
        """Smallest batch among feasible workers (with `below`: batch below it); ties: the most free
        blocks."""
        for batch in self._level_keys:
            if below is not None and batch >= below:
                break
            best: tuple[int, int] | None = None
            for block_size, entries in self._levels[batch].items():
                last = entries[-1]
                if last[0] >= blocks_for(prompt_len, block_size) + batch and (best is None or last > best):
                    best = last
            if best is not None:
                return self.slots[best[1]]
        return None

    def feasible_slots(self, prompt_len: int, *, below: int | None = None) -> list[WorkerSlot]:
        return [s for s in self.slots if s.feasible(prompt_len, below)]

    # ------------------------------------------------------------ keeping an index across passes

    def refresh(self, snap: WorkerSnapshot) -> None:
        """Reload one worker from a newer snapshot, as if the index were rebuilt (a caller that keeps
        an index across passes refreshes every worker whose snapshot changed, including those its
        last pass placed on). The worker must keep its place: an added, removed or no longer active
        worker needs a rebuild."""
        slot = self.by_id[snap.worker_id]
        if snap.state is not WorkerState.ACTIVE:
            raise ValueError(f"worker {snap.worker_id} is {snap.state.value}: rebuild the index")
        self._detach(slot)
        old_total = slot.total
        slot.load(snap)
        self._attach(slot)
        if slot.total >= self.max_total_blocks:
            self.max_total_blocks = slot.total
        elif old_total == self.max_total_blocks:
            self.max_total_blocks = max(s.total for s in self.slots)

    def append(self, snap: WorkerSnapshot) -> None:
        """Add an active worker after all the others (it takes the last place, as in a rebuild)."""
        if snap.state is not WorkerState.ACTIVE or snap.worker_id in self.by_id:
            raise ValueError(f"worker {snap.worker_id}: only a new active worker can be appended")
        slot = WorkerSlot(len(self.slots), snap)
        self.slots.append(slot)
        self.by_id[slot.worker_id] = slot
        self._attach(slot)
        self.max_total_blocks = max(self.max_total_blocks, slot.total)

    # ------------------------------------------------------------ updates

    def assign(self, slot: WorkerSlot, adapter: str | None, prompt_len: int) -> None:
        """Record a placement on the working copy."""
        if not slot.feasible(prompt_len):
            raise ValueError(f"worker {slot.worker_id} cannot take a {prompt_len}-token prompt")
        self._unlink(slot)
        slot.free -= blocks_for(prompt_len, slot.block_size)
        slot.batch += 1
        if adapter is not None and adapter not in slot.resident:
            slot.resident = set(slot.resident) | {adapter}
            self._resident.setdefault(adapter, set()).add(slot.order)
        if slot.batch < slot.max_batch:
            self._link(slot)

    def withdraw(self, slot: WorkerSlot) -> None:
        """Take a worker out of the bucket queries (`best_packing`, `least_loaded`) for good: a
        consolidation source, which must never become a target."""
        self._detach(slot)

    def set_load(self, slot: WorkerSlot, batch: int, free: int, resident: frozenset[str] | set[str]) -> None:
        """Set a slot's batch, free blocks and resident adapters: to undo `assign`s of a plan given
        up, or as a cheaper `refresh` for a caller that knows nothing else of the worker changed
        (its state, shape and place). A no-op when they are unchanged."""
        same_resident = slot.resident is resident or slot.resident == resident
        if same_resident and slot.batch == batch and slot.free == free:
            return
        if same_resident:  # the common case: only its bucket changes
            if slot.batch < slot.max_batch:
                self._unlink(slot)
            slot.batch, slot.free, slot.resident = batch, free, resident
            if batch < slot.max_batch:
                self._link(slot)
            return
        self._detach(slot)
        slot.batch, slot.free, slot.resident = batch, free, resident
        self._attach(slot)

    def _attach(self, slot: WorkerSlot) -> None:
        for adapter in slot.resident:
            self._resident.setdefault(adapter, set()).add(slot.order)
        if slot.batch < slot.max_batch:
            self._link(slot)

    def _detach(self, slot: WorkerSlot) -> None:
        if slot.batch < slot.max_batch:
            self._unlink(slot)
        for adapter in slot.resident:
            holders = self._resident.get(adapter)
            if holders is not None:
                holders.discard(slot.order)
                if not holders:
                    del self._resident[adapter]

    def _link(self, slot: WorkerSlot) -> None:
        groups = self._levels.get(slot.batch)
        if groups is None:
            groups = self._levels[slot.batch] = {}
            insort(self._level_keys, slot.batch)
        insort(groups.setdefault(slot.block_size, []), (slot.free, slot.order))

    def _unlink(self, slot: WorkerSlot) -> None:
        groups = self._levels[slot.batch]
        entries = groups[slot.block_size]
        del entries[bisect_left(entries, (slot.free, slot.order))]
        if not entries:
            del groups[slot.block_size]
            if not groups:
                del self._levels[slot.batch]
                del self._level_keys[bisect_left(self._level_keys, slot.batch)]
