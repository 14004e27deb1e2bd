"""ConsolidationPolicy: the periodic pass that keeps the fleet as small as its load.

Run every few seconds over the current snapshots, it plans, in this order:
1. KV-pressure evictions: a worker that cannot give each running sequence one spare block has its
   newest sequences evicted (placed again like new requests) until it can; its oldest always stays.
2. Migrations: the least-loaded workers are emptied into busier workers that have room (Punica's
   packing rule picks each target), so they become idle. A source is drained completely or not at
   all (a partial move only shuffles work), and a source whose sequences are about to finish is left
   to drain by itself, since recomputing their KV would cost more than it saves.
3. Releases: a worker idle for `idle_release_s` is released while more than `min_workers` remain and
   nothing is queued; a draining worker is released as soon as it is empty.
Deterministic for a given input and clock reading.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

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

    __slots__ = ("batch", "free", "order", "resident", "role", "snap")

    def __init__(self, order: int, snap: WorkerSnapshot) -> None:
        self.order = order
        self.snap = snap
        self.batch = snap.num_running
        self.free = snap.free_kv_blocks
        self.resident: frozenset[str] | set[str] = snap.resident_adapters
        self.role: str | None = None  # "source", "target" or "evicting" once touched this pass

    def fits(self, seq: RunningSeq) -> bool:
        need = blocks_for(seq.num_tokens, self.snap.block_size) + self.batch
        return self.batch < self.snap.max_batch_size and self.free >= need


class ConsolidationPolicy:
    def __init__(
        self,
        *,
        min_workers: int = 1,
        idle_release_s: float = 30.0,
        max_migrations: int = 32,
        min_remaining_tokens: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
        # Draining workers first (they must empty), then the lightest.
        sources.sort(key=lambda p: (p.snap.state is not WorkerState.DRAINING, p.batch, p.order))
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
            moves = self._fit_all(plans, src, seqs, min_batch=0 if draining else src.batch)
            if moves is None:
                continue
            src.role = "source"
            for seq, target in moves:
                out.append(Migrate(seq.request_id, src.snap.worker_id, target.snap.worker_id))
                budget -= 1

    def _fit_all(
        self, plans: list[_Plan], src: _Plan, seqs: list[RunningSeq], *, min_batch: int
    ) -> list[tuple[RunningSeq, _Plan]] | None:
        """Targets for every sequence of `src` (applied to the copies), or None (copies unchanged)."""
        moves: list[tuple[RunningSeq, _Plan]] = []
        undo: list[tuple[_Plan, int, int, frozenset[str] | set[str], str | None]] = []
        for seq in seqs:
            target = self._best_target(plans, src, seq, min_batch)
            if target is None:
                for p, batch, free, resident, role in reversed(undo):
                    p.batch, p.free, p.resident, p.role = batch, free, resident, role
                return None
            undo.append((target, target.batch, target.free, target.resident, target.role))
            target.batch += 1
            target.free -= blocks_for(seq.num_tokens, target.snap.block_size)
            if seq.adapter is not None and seq.adapter not in target.resident:
                target.resident = set(target.resident) | {seq.adapter}
            target.role = "target"
            moves.append((seq, target))
        return moves

    @staticmethod
    def _best_target(plans: list[_Plan], src: _Plan, seq: RunningSeq, min_batch: int) -> _Plan | None:
        # Punica's rule again: the largest batch that fits it, adapter resident, fewer free blocks.
        best: _Plan | None = None
        best_key: tuple[int, int, int, int] | None = None
        for p in plans:
            if p is src or p.snap.state is not WorkerState.ACTIVE or p.role in ("source", "evicting"):
                continue
            if p.batch < min_batch or not p.fits(seq):
                continue
            key = (-p.batch, seq.adapter not in p.resident, p.free, p.order)
            if best_key is None or key < best_key:
                best, best_key = p, key
        return best

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
