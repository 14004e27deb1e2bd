"""The discrete-event fleet simulator: the scheduler's own policies on a virtual clock.

It plays the part of `scheduler/runtime.py` with simulated workers instead of Ray actors: the same
`RequestQueue`, the same `make_placement_policy` placement passes (on admission and whenever a worker
reports while requests wait), the same `ConsolidationPolicy` pass every `consolidation_interval_s`
(decisions grouped by `group_moves`, as the runtime does), workers started on `StartWorker` (ready
after the profile's start-up time) and stopped on `ReleaseWorker`. Snapshots come from
`WorkerSnapshot.from_load`, the runtime's own builder. Migration exports a sequence at the source's
next step boundary and re-prefills its whole context on the target.

Event order at equal times: step ends, worker ready, arrivals, placement, consolidation.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import overload

from lorafleet.scheduler.consolidation import ConsolidationPolicy, group_moves
from lorafleet.scheduler.placement_index import PlacementIndex
from lorafleet.scheduler.policy import make_placement_policy
from lorafleet.scheduler.policy_types import (
    PendingRequest,
    Place,
    Reject,
    StartWorker,
    WorkerSnapshot,
    WorkerState,
    blocks_for,
)
from lorafleet.scheduler.request_queue import RequestQueue
from lorafleet.sim.profile import LatencyProfile
from lorafleet.sim.sequences import RequestRecord, SimSeq
from lorafleet.sim.sim_types import SimConfig, SimRequest, SimResult
from lorafleet.sim.worker import SimWorker

# Event kinds, in the order they run at equal times (arrivals are merged in from the sorted trace).
_PHASE, _READY, _ARRIVAL, _PLACE, _CONSOLIDATE = 0, 1, 2, 3, 4


class Simulator:
    def __init__(
        self,
        config: SimConfig,
        profile: LatencyProfile,
        requests: Sequence[SimRequest],
        *,
        on_done: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.config = config
        self.profile = profile
        self.requests = requests
        self.on_done = on_done
        self.now = 0.0
        max_migrations = config.max_migrations_per_pass if config.migrations else 0
        target = config.pack_batch_target
        if target is not None and target > profile.engine.max_batch_size:
            raise ValueError(
                f"pack_batch_target ({target}) must be <= the worker's max_batch_size "
                f"({profile.engine.max_batch_size})"
            )
        self.placement = make_placement_policy(
            config.policy, max_workers=config.max_gpus, batch_target=target, seed=config.seed
        )
        self.consolidation = ConsolidationPolicy(
            min_workers=config.min_gpus,
            idle_release_s=config.idle_release_s,
            max_migrations=max_migrations,
            min_remaining_tokens=config.min_remaining_tokens,
            batch_target=target,
            clock=lambda: self.now,
        )
        self.queue = RequestQueue()
        self.queued: dict[str, tuple[PendingRequest, RequestRecord]] = {}  # waiting for placement
        self.records: list[RequestRecord] = []
        self.workers: dict[str, SimWorker] = {}
        self.live: list[SimWorker] = []  # not stopped, in start order
        self.stopped: list[SimWorker] = []
        self.move_target: dict[str, str | None] = {}
        self.counters = dict.fromkeys(
            ("migrations", "evictions", "requeued_migrations", "worker_starts", "workers_released"), 0
        )
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._place_at: float | None = None
        self._last_place = -math.inf
        self._outstanding = 0
        # Skipping placement passes that cannot place anything (a pure speed-up): with strict FCFS a
        # blocked head stays blocked until capacity frees (a finish, an export, a worker ready or
        # stopped); `_epoch` counts those, `_blocked` remembers (epoch, head) of the last failed pass.
        self._epoch = 0
        # The placement index kept across passes: rebuilt when a worker leaves the active set,
        # extended by workers that became active, refreshed for those that changed (`_changed`).
        self._index: PlacementIndex | None = None
        self._index_stale = True
        self._index_last = -1  # start order of the last worker in the index
        self._new_active: list[SimWorker] = []
        self._changed: list[SimWorker] = []
        self._snapshots = _Snapshots(self.live)
        self._blocked: tuple[int, str] | None = None
        self.gpus_over_time: list[tuple[float, int]] = []
        self.busy_over_time: list[tuple[float, int, int]] = []  # (t, live, busy) at each busy change
        self._busy = 0
        self.peak = 0

    # ------------------------------------------------------------ events

    def _push(self, t: float, kind: int, obj: object) -> None:
        # The kind doubles as the priority among events at the same time; the counter keeps FIFO.
        heapq.heappush(self._heap, (t, kind, next(self._seq), obj))

    def run(self) -> SimResult:
        # The run keeps millions of long-lived objects (a record per request) and frees its
        # per-event ones by reference counting (they form no cycles), so the cyclic collector's
        # passes over the growing heap are pure cost: up to a seventh of the time on 1M requests.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if collecting:
                gc.enable()

    def _run(self) -> SimResult:
        for _ in range(self.config.min_gpus):
            self._start_worker(0.0, ready_now=True)
        self._push(self.config.consolidation_interval_s, _CONSOLIDATE, None)
        reqs, n, i = self.requests, len(self.requests), 0
        heap = self._heap
        prev_at = -math.inf
        stalled_ticks = 0
        heappop = heapq.heappop
        next_at = reqs[0].at_s if n else math.inf
        while True:
            # Events before arrivals at equal times only if their kind runs first (phase end, ready).
            top = heap[0] if heap else None
            if top is not None and (top[0] < next_at or (top[0] == next_at and top[1] < _ARRIVAL)):
                t, kind, _, obj = heappop(heap)
                self.now = t
                if kind == _PHASE:
                    worker, phase = obj  # type: ignore[misc]
                    if worker.phase is phase and phase.end == t:  # else superseded (cut short)
                        self._on_phase_end(worker, t)
                elif kind == _READY:
                    self._on_ready(obj, t)  # type: ignore[arg-type]
                elif kind == _PLACE:
                    self._place_at = None
                    self._last_place = t
                    self._place(t)
                else:
                    self._consolidate(t)
                    if i < n or self._outstanding:
                        # Only this tick left to come, twice in a row, with requests unfinished and
                        # no arrival due: nothing can ever change again (a bug, not a workload).
                        idle = not heap and i >= n
                        stalled_ticks = stalled_ticks + 1 if idle else 0
                        if stalled_ticks >= 2:
                            raise RuntimeError(
                                f"simulation stalled at {t:.1f} s with {self._outstanding} requests "
                                f"unfinished ({len(self.queue)} queued)"
                            )
                        self._push(t + self.config.consolidation_interval_s, _CONSOLIDATE, None)
            elif i < n:
                req = reqs[i]
                if req.at_s < prev_at:
                    raise ValueError(f"request {i}: arrival {req.at_s} s is before the previous one")
                prev_at = req.at_s
                self.now = req.at_s
                self._arrive(f"r{i}", req)
                i += 1
                next_at = reqs[i].at_s if i < n else math.inf
            else:
                break
            if i >= n and not self._outstanding:
                break
        if self._outstanding:
            raise RuntimeError(f"simulation stalled with {self._outstanding} requests unfinished")
        end = max((r.finish or r.arrival for r in self.records), default=0.0)
        gpu_s = sum((w.stopped_at if w.stopped_at is not None else end) - w.requested_at for w in self._all())
        return SimResult(
            config=self.config,
            profile=self.profile.name,
            records=self.records,
            end_s=end,
            gpu_seconds=gpu_s,
            peak_gpus=self.peak,
            migrations=self.counters["migrations"],
            evictions=self.counters["evictions"],
            requeued_migrations=self.counters["requeued_migrations"],
            preemptions=sum(w.preemptions for w in self._all()),
            adapter_loads=sum(w.adapter_loads for w in self._all()),
            adapter_disk_loads=sum(w.adapter_disk_loads for w in self._all()),
            worker_starts=self.counters["worker_starts"],
            workers_released=self.counters["workers_released"],
            gpus_over_time=self.gpus_over_time,
            busy_over_time=self.busy_over_time,
        )

    def _all(self) -> list[SimWorker]:
        return self.stopped + self.live

    # ------------------------------------------------------------ requests

    def _arrive(self, rid: str, req: SimRequest) -> None:
        rec = RequestRecord(rid, req.at_s, req.adapter, req.prompt_tokens, req.output_tokens)
        self.records.append(rec)
        self._outstanding += 1
        # The fleet's admission check (scheduler/fleet.py): a request that could outgrow a worker's
        # whole KV cache is refused up front, or the engine would preempt it forever.
        e = self.profile.engine
        longest = min(req.prompt_tokens + req.output_tokens, e.max_model_len)
        if blocks_for(longest, e.block_size) > e.num_kv_blocks:
            rec.rejected = (
                f"up to {longest} tokens need more KV blocks than a worker holds "
                f"({e.num_kv_blocks} of {e.block_size} tokens)"
            )
            self._finish(rec)
            return
        self._enqueue(PendingRequest(rid, req.adapter, req.prompt_tokens, req.output_tokens, req.at_s), rec)
        self._want_placement(req.at_s)

    def _enqueue(self, pending: PendingRequest, rec: RequestRecord, *, front: bool = False) -> None:
        self.queued[pending.request_id] = (pending, rec)
        if front:
            self.queue.push_front(pending)
        else:
            self.queue.push(pending)

    def _finish(self, rec: RequestRecord) -> None:
        self._outstanding -= 1
        if self.on_done is not None:
            self.on_done(rec)

    def _want_placement(self, now: float) -> None:
        if self._place_at is None:
            self._place_at = max(now, self._last_place + self.config.placement_interval_s)
            self._push(self._place_at, _PLACE, None)

    def _place(self, now: float) -> None:
        head = self.queue.peek()
        if head is None or self._blocked == (self._epoch, head.request_id):
            return
        decisions = self.placement.schedule(self.queue, self._snapshots, index=self._sync_index())
        head = self.queue.peek()
        self._blocked = (self._epoch, head.request_id) if head is not None else None
        for d in decisions:
            if isinstance(d, Place):
                pending, rec = self.queued.pop(d.request_id)
                worker = self.workers[d.worker_id]
                worker.add(SimSeq(rec, pending.prompt_len, pending.max_new_tokens, now))
                self._sync_busy(worker, now)
                self._kick(worker, now)
            elif isinstance(d, Reject):
                _, rec = self.queued.pop(d.request_id)
                rec.rejected = d.reason
                self._finish(rec)
            elif isinstance(d, StartWorker):
                self._start_worker(now)

    def _sync_index(self) -> PlacementIndex | None:
        """The placement index of the active workers, kept across passes: rebuilt when a worker
        left the active set (or one joined out of start order), else extended by the workers that
        became active and refreshed for those that changed since the last pass: exactly what a
        rebuild would hold (tests check it), at a cost that follows the changes, not the fleet."""
        if not self.config.keep_index:
            return None
        index = self._index
        if index is not None and not self._index_stale:
            for w in self._new_active:
                if w.order < self._index_last:
                    self._index_stale = True
                    break
                if w.state is WorkerState.ACTIVE:
                    index.append(w.snapshot())
                    self._index_last = w.order
        if index is None or self._index_stale:
            active = [w for w in self.live if w.state is WorkerState.ACTIVE]
            index = self._index = PlacementIndex(w.snapshot() for w in active)
            self._index_stale = False
            self._index_last = active[-1].order if active else -1
        else:
            by_id = index.by_id
            for w in self._changed:
                slot = by_id.get(w.worker_id) if w.state is WorkerState.ACTIVE else None
                if slot is not None:  # shape and state are as indexed: only the load can differ
                    index.set_load(slot, *w.placement_load())
        for w in self._changed:
            w.listed = False
        self._changed.clear()
        self._new_active.clear()
        return index

    # ------------------------------------------------------------ workers

    def _start_worker(self, now: float, *, ready_now: bool = False) -> None:
        if len(self.live) >= self.config.max_gpus:
            return
        order = next(self._ids)
        worker = SimWorker(f"worker-{order}", order, self.profile, now, changed=self._changed)
        self.workers[worker.worker_id] = worker
        self.live.append(worker)
        self.counters["worker_starts"] += 1
        self._record_gpus(now)
        if ready_now:
            self._on_ready(worker, now)
        else:
            self._push(now + self.profile.worker_start_s, _READY, worker)

    def _on_ready(self, worker: SimWorker, now: float) -> None:
        if worker.state is not WorkerState.STARTING:
            return
        self._epoch += 1
        worker.state = WorkerState.ACTIVE
        worker.idle_since = now
        worker.touch()
        self._new_active.append(worker)
        self._want_placement(now)

    def _stop(self, worker: SimWorker, now: float) -> None:
        self._epoch += 1
        self._index_stale = True
        worker.state = WorkerState.STOPPED
        worker.stopped_at = now
        self.live.remove(worker)
        self.stopped.append(worker)
        self.counters["workers_released"] += 1
        self._record_gpus(now)

    def _record_gpus(self, now: float) -> None:
        live = len(self.live)
        self.peak = max(self.peak, live)
        self.gpus_over_time.append((now, live))

    def _plan(self, worker: SimWorker, now: float) -> None:
        cores = self.config.cpu_cores
        if cores is not None:
            computing = 1 + sum(1 for w in self.live if w.phase is not None and w is not worker)
            worker.slowdown = max(1.0, computing / cores)
        phase = worker.plan(now)
        if phase is not None:
            heapq.heappush(self._heap, (phase.end, _PHASE, next(self._seq), (worker, phase)))

    def _sync_busy(self, worker: SimWorker, now: float) -> None:
        busy = bool(worker.owned)
        if busy != worker.busy:
            worker.busy = busy
            self._busy += 1 if busy else -1
            self.busy_over_time.append((now, len(self.live), self._busy))

    def _kick(self, worker: SimWorker, now: float) -> None:
        """Something changed on `worker` at `now`: plan a step if it is idle, else cut its phase."""
        if worker.phase is None:
            if worker.inbox_exports:
                self._handle_exports(worker, now)
            self._plan(worker, now)
            return
        old_end = worker.phase.end
        end = worker.cut(now)
        if end != old_end:
            self._push(end, _PHASE, (worker, worker.phase))

    def _on_phase_end(self, worker: SimWorker, t: float) -> None:
        finished = worker.end_phase(t)
        if finished:
            self._epoch += 1
            for seq in finished:
                self._finish(seq.record)
        if worker.inbox_exports:
            self._handle_exports(worker, t)
        self._sync_busy(worker, t)
        if worker.state is WorkerState.DRAINING and not worker.owned:
            self._stop(worker, t)
        else:
            self._plan(worker, t)
        if len(self.queue):
            self._want_placement(t)

    def _handle_exports(self, src: SimWorker, now: float) -> None:
        self._epoch += 1
        exported = src.take_exports()
        self._sync_busy(src, now)
        for seq in exported:
            rec = seq.record
            target = self.move_target.pop(rec.rid, None)
            dst = self.workers.get(target) if target is not None else None
            prompt, remaining = seq.num_tokens, seq.output - seq.generated
            if dst is None or dst.state is not WorkerState.ACTIVE:
                self.counters["evictions" if dst is None else "requeued_migrations"] += 1
                rec.evictions += dst is None
                self._enqueue(
                    PendingRequest(rec.rid, rec.adapter, prompt, remaining, rec.arrival), rec, front=True
                )
                self._want_placement(now)
                continue
            dst.add(SimSeq(rec, prompt, remaining, now))
            self._sync_busy(dst, now)
            self.counters["migrations"] += 1
            rec.migrations += 1
            self._kick(dst, now)

    # ------------------------------------------------------------ consolidation

    def _consolidate(self, now: float) -> None:
        live = self.live
        decisions = self.consolidation.plan([w.snapshot() for w in live], queue_len=len(self.queue))
        moves, releases = group_moves(decisions)
        for d in releases:
            worker = self.workers.get(d.worker_id)
            if worker is not None and worker.state is not WorkerState.STOPPED:
                worker.state = WorkerState.DRAINING
                worker.touch()
                self._index_stale = True
                if not worker.owned:
                    self._stop(worker, now)
        for (source, target), rids in moves.items():
            src = self.workers.get(source)
            if src is None or src.state is WorkerState.STOPPED:
                continue
            for rid in rids:
                seq = src.owned.get(rid)
                if seq is not None and not seq.exporting:
                    self.move_target[rid] = target
                    src.request_export(seq)
            self._kick(src, now)


class _Snapshots(Sequence[WorkerSnapshot]):
    """The live workers' snapshots as the placement policy's `workers`, built only when read: with
    a kept index the policy reads them only to decide whether the fleet may grow."""

    def __init__(self, workers: list[SimWorker]) -> None:
        self._workers = workers

    def __len__(self) -> int:
        return len(self._workers)

    @overload
    def __getitem__(self, i: int) -> WorkerSnapshot: ...

    @overload
    def __getitem__(self, i: slice) -> list[WorkerSnapshot]: ...

    def __getitem__(self, i: int | slice) -> WorkerSnapshot | list[WorkerSnapshot]:
        if isinstance(i, slice):
            return [w.snapshot() for w in self._workers[i]]
        return self._workers[i].snapshot()

    def __iter__(self) -> Iterator[WorkerSnapshot]:
        return (w.snapshot() for w in self._workers)
