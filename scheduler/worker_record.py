"""The head's view of one worker: its actor, state, last report, and the requests it runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from lorafleet.scheduler.policy_types import RunningSeq, WorkerSnapshot, WorkerState
from lorafleet.scheduler.tracked_request import TrackedRequest
from lorafleet.scheduler.worker_actor import WorkerInfo
from lorafleet.worker.types import EngineStats

# Cumulative engine counters the fleet reports summed over its workers, stopped ones included.
ENGINE_TOTALS = ("num_preemptions", "num_adapter_loads", "adapter_cache_hits", "adapter_cache_misses")


def add_engine_totals(totals: dict[str, int], stats: EngineStats | None) -> None:
    if stats is not None:
        for key in ENGINE_TOTALS:
            totals[key] = totals.get(key, 0) + getattr(stats, key)


@dataclass
class WorkerRecord:
    worker_id: str
    order: int  # start sequence number: workers are given to the policies in this order
    handle: Any = None  # Ray actor handle
    state: WorkerState = WorkerState.STARTING
    info: WorkerInfo | None = None
    stats: EngineStats | None = None
    assigned: dict[str, TrackedRequest] = field(default_factory=dict)  # requests it runs, by id
    idle_since: float | None = None
    stream_task: asyncio.Task | None = None
    last_error: str | None = None

    def assign(self, rec: TrackedRequest, now: float) -> None:
        rec.owner = self.worker_id
        rec.placed_at = now
        self.assigned[rec.request_id] = rec
        self.idle_since = None

    def unassign(self, request_id: str, now: float) -> None:
        if self.assigned.pop(request_id, None) is not None and not self.assigned:
            self.idle_since = now

    def snapshot(self) -> WorkerSnapshot:
        """The load the policies see: the head's own assignment list (authoritative for the batch)
        and the worker's last KV figures, less the blocks of sequences it has not taken on yet."""
        info, stats = self.info, self.stats
        if info is None or stats is None:
            return WorkerSnapshot(self.worker_id, self.state, (), 1, 0, 0, 1, frozenset(), self.idle_since)
        running = tuple(
            RunningSeq(r.request_id, r.request.adapter, r.num_tokens, r.placed_at, r.remaining_tokens)
            for r in self.assigned.values()
        )
        in_engine = set(stats.running_request_ids)
        return WorkerSnapshot.from_load(
            self.worker_id,
            self.state,
            running,
            pending_tokens=(r.num_tokens for r in self.assigned.values() if r.request_id not in in_engine),
            engine_free_blocks=stats.num_free_kv_blocks,
            max_batch_size=info.max_batch_size,
            total_kv_blocks=info.total_kv_blocks,
            block_size=info.block_size,
            resident_adapters=frozenset(stats.resident_adapters),
            idle_since=self.idle_since,
        )
