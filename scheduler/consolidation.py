"""ConsolidationPolicy: the periodic pass that keeps the fleet as small as its load.

Run every few seconds over the current snapshots, it plans, in this order:
1. KV-pressure evictions: a worker that cannot give each running sequence one spare block has its
   newest sequences evicted (placed again like new requests) until it can; its oldest always stays.
2. Migrations: the least-loaded workers are emptied into busier workers that have room (Punica's
   packing rule picks each target, below the placement batch target if one is set), so they become
   idle. A source is drained completely or not at all (a partial move only shuffles work), and a
   source whose sequences are about to finish is left to drain by itself, since recomputing their KV
   would cost more than it saves.
3. Releases: a worker idle for `idle_release_s` is released while more than `min_workers` remain and
   nothing is queued; a draining worker is released as soon as it is empty.
Deterministic for a given input and clock reading.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from lorafleet.scheduler.placement_index import PlacementIndex, WorkerSlot
from lorafleet.scheduler.policy_types import (
    Decision,
    Evict,
    Migrate,
    ReleaseWorker,
    RunningSeq,
    WorkerSnapshot,
    WorkerState,
    blocks_for,
)


def group_moves(
    decisions: Sequence[Decision],
) -> tuple[dict[tuple[str, str | None], list[str]], list[ReleaseWorker]]:
    """A pass's decisions as the runtime and the simulator carry them out: one export per
    (source, target) pair, in decision order (target None = evict back to the queue), and the
    releases."""
    moves: dict[tuple[str, str | None], list[str]] = {}
    releases: list[ReleaseWorker] = []
    for d in decisions:
        if isinstance(d, Migrate):
            moves.setdefault((d.source, d.target), []).append(d.request_id)
        elif isinstance(d, Evict):
            moves.setdefault((d.worker_id, None), []).append(d.request_id)
        elif isinstance(d, ReleaseWorker):
            releases.append(d)
    return moves, releases


class _Plan:
    """Working copy of one worker during a pass."""

    __slots__ = ("batch", "free", "order", "role", "snap")

    def __init__(self, order: int, snap: WorkerSnapshot) -> None:
        self.order = order
        self.snap = snap
        self.batch = snap.num_running
        self.free = snap.free_kv_blocks
        self.role: str | None = None  # "source", "target" or "evicting" once touched this pass


class ConsolidationPolicy:
    def __init__(
        self,
        *,
        min_workers: int = 1,
        idle_release_s: float = 30.0,
        max_migrations: int = 32,
        min_remaining_tokens: int = 4,
        batch_target: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_target is not None and (
            isinstance(batch_target, bool) or not isinstance(batch_target, int) or batch_target < 1
        ):
            raise ValueError(f"batch_target must be an integer >= 1 or None, got {batch_target!r}")
        if min_workers < 0:
            raise ValueError(f"min_workers must be >= 0, got {min_workers}")
        if idle_release_s < 0:
            raise ValueError(f"idle_release_s must be >= 0, got {idle_release_s}")
        if max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {max_migrations}")
        self.min_workers = min_workers
        self.idle_release_s = idle_release_s
        self.max_migrations = max_migrations
        self.min_remaining_tokens = min_remaining_tokens
        # The placement policy's batch target: a migration fills a target only up to it, as a
        # placement would (else consolidation would undo the target by packing workers to the limit).
        self.batch_target = batch_target
        self.clock = clock

    def plan(self, workers: Sequence[WorkerSnapshot], *, queue_len: int = 0) -> list[Decision]:
        plans = [_Plan(i, w) for i, w in enumerate(workers) if w.state is not WorkerState.STOPPED]
        decisions: list[Decision] = []
        self._evictions(plans, decisions)
        self._migrations(plans, decisions)
        self._releases(plans, decisions, queue_len)
        return decisions

    # ------------------------------------------------------------ 1. KV pressure

    def _evictions(self, plans: list[_Plan], out: list[Decision]) -> None:
        for p in plans:
            if p.snap.state is WorkerState.STARTING or p.free >= p.batch or p.batch < 2:
                continue
            p.role = "evicting"
            newest_first = sorted(p.snap.running, key=lambda s: (s.started_at, s.request_id), reverse=True)
            for seq in newest_first[:-1]:
                if p.free >= p.batch:
                    break
                out.append(
                    Evict(
                        seq.request_id, p.snap.worker_id, f"{p.free} free KV blocks for {p.batch} sequences"
                    )
                )
                p.free += blocks_for(seq.num_tokens, p.snap.block_size)
                p.batch -= 1

    # ------------------------------------------------------------ 2. migrations

    def _migrations(self, plans: list[_Plan], out: list[Decision]) -> None:
        budget = self.max_migrations
        sources = [
            p
            for p in plans
            if p.role is None and p.batch > 0 and p.snap.state in (WorkerState.ACTIVE, WorkerState.DRAINING)
        ]
        if budget <= 0 or not sources:
            return
        # Draining workers first (they must empty), then the lightest.
        sources.sort(key=lambda p: (p.snap.state is not WorkerState.DRAINING, p.batch, p.order))
        # Targets are found with the placement index (Punica's rule again, ~O(log W) per sequence
        # instead of a scan of the fleet): every active worker not evicting, in input order.
        by_id = {p.snap.worker_id: p for p in plans}
        index = PlacementIndex(p.snap for p in plans if p.role is None and p.snap.state is WorkerState.ACTIVE)
        for src in sources:
            if budget <= 0:
                break
            if src.role is not None or src.batch > budget:
                continue
            draining = src.snap.state is WorkerState.DRAINING
            seqs = sorted(src.snap.running, key=lambda s: (s.started_at, s.request_id))
            if not draining and any(
                s.remaining_tokens is not None and s.remaining_tokens < self.min_remaining_tokens
                for s in seqs
            ):
                continue
            moves = self._fit_all(
                index, src, seqs, min_batch=0 if draining else src.batch, below=self.batch_target
            )
            if moves is None:
                continue
            src.role = "source"
            for seq, slot in moves:
                target = by_id[slot.worker_id]
                target.role = "target"
                target.batch += 1
                target.free -= blocks_for(seq.num_tokens, target.snap.block_size)
                out.append(Migrate(seq.request_id, src.snap.worker_id, slot.worker_id))
                budget -= 1

    @staticmethod
    def _fit_all(
        index: PlacementIndex, src: _Plan, seqs: list[RunningSeq], *, min_batch: int, below: int | None
    ) -> list[tuple[RunningSeq, WorkerSlot]] | None:
        """Targets for every sequence of `src`, each the largest batch that fits it (adapter
        resident, then fewer free blocks, then input order), applied to the index; or None, with
        the index as it was. A source, once chosen, leaves the index: it is never a target."""
        own = index.by_id.get(src.snap.worker_id)  # None for a draining source (not indexed)
        moves: list[tuple[RunningSeq, WorkerSlot]] = []
        undo: list[tuple[WorkerSlot, int, int, frozenset[str] | set[str]]] = []
        for seq in seqs:
            slot = index.best_packing(
                seq.adapter, seq.num_tokens, min_batch=min_batch, exclude=own, below=below
            )
            if slot is None:
                for target, batch, free, resident in reversed(undo):
                    index.set_load(target, batch, free, resident)
                return None
            undo.append((slot, slot.batch, slot.free, slot.resident))
            index.assign(slot, seq.adapter, seq.num_tokens)
            moves.append((seq, slot))
        if own is not None:
            index.withdraw(own)
        return moves

    # ------------------------------------------------------------ 3. releases

    def _releases(self, plans: list[_Plan], out: list[Decision], queue_len: int) -> None:
        now = self.clock()
        live = sum(1 for p in plans if p.snap.state in (WorkerState.ACTIVE, WorkerState.STARTING))
        for p in plans:
            if p.snap.state is WorkerState.DRAINING and p.batch == 0 and p.role is None:
                out.append(ReleaseWorker(p.snap.worker_id, "drained"))
        if queue_len > 0:
            return
        idle = [
            p
            for p in plans
            if p.snap.state is WorkerState.ACTIVE
            and p.snap.num_running == 0
            and p.role is None
            and p.snap.idle_since is not None
            and now - p.snap.idle_since >= self.idle_release_s
        ]
        idle.sort(key=lambda p: (p.snap.idle_since, p.order))
        for p in idle:
            if live <= self.min_workers:
                break
            out.append(ReleaseWorker(p.snap.worker_id, f"idle for {now - p.snap.idle_since:.1f} s"))
            live -= 1
