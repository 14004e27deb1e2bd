"""FleetRuntime: the scheduler, running in the head process's asyncio loop.

It owns the fleet state (workers, admitted requests, the FCFS queue), turns the policies' decisions
into actor calls, and consumes every worker's report stream. Everything here runs on one event
loop, so no locks: each handler sees and updates a consistent state between awaits.

Invariants that keep every request accounted for:
- An admitted request is in exactly one place: the queue, or `assigned` of its owner worker.
- A worker's report only counts for requests it owns; a migrated request's owner changes only once
  its export has returned, and tokens the export holds beyond what was delivered are delivered from
  it (`TrackedRequest.catch_up`), so late reports from the source are safely ignored.
- A dead worker's requests go back to the front of the queue with their delivered tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine
from typing import Any

from lorafleet.scheduler.consolidation import ConsolidationPolicy, group_moves
from lorafleet.scheduler.errors import short_reason
from lorafleet.scheduler.fleet_config import FleetConfig
from lorafleet.scheduler.migration import MoveHooks, drain_released, move
from lorafleet.scheduler.policy import make_placement_policy
from lorafleet.scheduler.policy_types import (
    PendingRequest,
    Place,
    Reject,
    StartWorker,
    WorkerState,
)
from lorafleet.scheduler.report_delivery import deliver_report
from lorafleet.scheduler.request_queue import RequestQueue
from lorafleet.scheduler.tracked_request import TrackedRequest
from lorafleet.scheduler.worker_actor import StepReport, WorkerInfo, WorkItem
from lorafleet.scheduler.worker_launch import StartBackoff, kill_actor, launch_actor
from lorafleet.scheduler.worker_record import WorkerRecord, add_engine_totals
from lorafleet.worker.types import SequenceState

log = logging.getLogger("lorafleet.scheduler")

MAX_RESUMES = 3  # a request whose workers keep dying with it is failed, not retried forever


class FleetRuntime:
    def __init__(
        self,
        config: FleetConfig,
        adapter_path: Callable[[str], str | None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._adapter_path = adapter_path
        self.clock = clock
        self.workers: dict[str, WorkerRecord] = {}
        self.requests: dict[str, TrackedRequest] = {}
        self.queue = RequestQueue()
        self._resume_states: dict[str, SequenceState] = {}  # queued requests that carry outputs
        self.placement = make_placement_policy(
            config.policy,
            max_workers=config.max_workers,
            batch_target=config.pack_batch_target,
            seed=config.seed,
        )
        self.consolidation = ConsolidationPolicy(
            min_workers=config.min_workers,
            idle_release_s=config.idle_release_s,
            max_migrations=config.max_migrations_per_pass,
            min_remaining_tokens=config.min_remaining_tokens,
            batch_target=config.pack_batch_target,
            clock=clock,
        )
        self.counters: dict[str, float] = defaultdict(int)
        self._retired_totals: dict[str, int] = {}  # engine totals of stopped workers
        self.recent_load_seconds: deque[float] = deque(maxlen=1024)
        self.info: WorkerInfo | None = None  # limits of the first ready worker (all are built alike)
        self.last_start_error: str | None = None
        self.start_gave_up: str | None = None
        self.closing = False
        self.lost: str | None = None  # why the Ray cluster counts as lost (cluster_lost)
        self._torn_down = False
        self._worker_ids = itertools.count()
        self._backoff = StartBackoff()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._ready = asyncio.Event()  # a worker is active, or starting has been given up
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._placement_loop(), name="lorafleet-placement"),
            asyncio.create_task(self._consolidation_loop(), name="lorafleet-consolidation"),
        ]
        starts = [self._request_start("min_workers") for _ in range(self.config.min_workers)]
        await asyncio.gather(*(t for t in starts if t is not None))
        await self._ready.wait()

    async def shutdown(self, drain: bool) -> None:
        """Refuse new work; wait for (drain) or abort every admitted request; stop all workers.
        Idempotent; a drain cancelled midway leaves the fleet running its admitted requests."""
        self.closing = True
        if drain:
            await self._drained.wait()
        else:
            await asyncio.gather(*(self.abort(rid) for rid in list(self.requests)))
        if self._torn_down:
            return
        self._torn_down = True
        for task in self._loops:
            task.cancel()
        for rec in list(self.workers.values()):
            self._stop_worker(rec, "shutdown", count_release=False)
        pending = [t for t in self._tasks if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*self._loops, *pending, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet task %s failed", task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------ workers

    def live_workers(self) -> list[WorkerRecord]:
        return sorted(
            (w for w in self.workers.values() if w.state is not WorkerState.STOPPED), key=lambda w: w.order
        )

    def _request_start(self, reason: str) -> asyncio.Task | None:
        # Not refused while draining: the admitted requests a drain waits for may need a new worker
        # (e.g. theirs died), and refusing it would leave them, and the drain, waiting forever.
        if self._torn_down or self.start_gave_up is not None or self.lost is not None:
            return None
        if self._backoff.waiting(self.clock()):  # backing off after failed starts
            return None
        if len(self.live_workers()) >= self.config.max_workers:
            return None
        order = next(self._worker_ids)
        rec = WorkerRecord(worker_id=f"worker-{order}", order=order)
        self.workers[rec.worker_id] = rec
        log.info("starting %s (%s)", rec.worker_id, reason)
        return self._spawn(self._start_worker(rec), f"start-{rec.worker_id}")

    def set_worker_bounds(self, min_workers: int, max_workers: int) -> None:
        self.config = dataclasses.replace(self.config, min_workers=min_workers, max_workers=max_workers)
        self.placement.max_workers = max_workers
        self.consolidation.min_workers = min_workers
        self._ensure_min_workers()
        self._wake.set()

    def _ensure_min_workers(self) -> None:
        while len(self.live_workers()) < self.config.min_workers:
            if self._request_start("below min_workers") is None:
                return

    async def _start_worker(self, rec: WorkerRecord) -> None:
        try:
            info, stats = await launch_actor(rec, self.config)
        except asyncio.CancelledError:
            self._kill(rec)
            raise
        except Exception as exc:  # model missing, out of memory, timeout, no resources...
            self._start_failed(rec, exc)
            return
        if rec.state is not WorkerState.STARTING:  # stopped (shutdown) while starting
            self._kill(rec)
            return
        rec.info, rec.stats, rec.state = info, stats, WorkerState.ACTIVE
        rec.idle_since = self.clock()
        self.info = self.info or info
        self._backoff.succeeded()
        self.counters["worker_starts"] += 1
        self._ready.set()
        rec.stream_task = self._spawn(self._consume(rec), f"stream-{rec.worker_id}")
        self._wake.set()

    def _start_failed(self, rec: WorkerRecord, exc: BaseException) -> None:
        reason = short_reason(exc)
        log.warning("worker %s failed to start: %s", rec.worker_id, reason)
        rec.last_error = self.last_start_error = reason
        self._kill(rec)
        rec.state = WorkerState.STOPPED
        self.workers.pop(rec.worker_id, None)
        self.counters["worker_start_failures"] += 1
        delay = self._backoff.failed(self.config, self.clock())
        if delay is None:
            self.start_gave_up = f"{self._backoff.failures} consecutive worker starts failed; last: {reason}"
            self._ready.set()
            self._fail_queued_if_stranded()
            return
        self._spawn(self._retry_start_after(delay), f"retry-start-{rec.worker_id}")

    async def _retry_start_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._ensure_min_workers()
        self._wake.set()  # placement asks again if requests still wait for a worker

    def _kill(self, rec: WorkerRecord) -> None:
        # Without a GCS nothing can kill an actor; the workers end with their cluster.
        if self.lost is None:
            kill_actor(rec)

    def _stop_worker(self, rec: WorkerRecord, reason: str, *, count_release: bool = True) -> None:
        if rec.state is WorkerState.STOPPED:
            return
        log.info("stopping %s (%s)", rec.worker_id, reason)
        rec.state = WorkerState.STOPPED
        self.workers.pop(rec.worker_id, None)
        add_engine_totals(self._retired_totals, rec.stats)
        if count_release:
            self.counters["workers_released"] += 1
        if rec.stream_task is not None and rec.stream_task is not asyncio.current_task():
            rec.stream_task.cancel()
        self._kill(rec)

    def bookkeeping_sizes(self) -> dict[str, int]:
        """Entries of each per-request structure (leak checks: zero, or a bound, once idle)."""
        return {
            "requests": len(self.requests),
            "queue": len(self.queue),
            "resume_states": len(self._resume_states),
            "tasks": len(self._tasks),
            "workers": len(self.workers),
            "assigned": sum(len(w.assigned) for w in self.workers.values()),
            "counters": len(self.counters),
            "recent_load_seconds": len(self.recent_load_seconds),
        }

    def engine_totals(self) -> dict[str, int]:
        totals = dict(self._retired_totals)
        for w in self.workers.values():
            add_engine_totals(totals, w.stats)
        return totals

    async def _consume(self, rec: WorkerRecord) -> None:
        reason = "its report stream ended"
        try:
            async for ref in rec.handle.stream.options(num_returns="streaming").remote():
                self._on_report(rec, await ref)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # actor died (killed, node lost, engine crashed)
            reason = short_reason(exc)
        if rec.state is not WorkerState.STOPPED:
            self._on_worker_dead(rec, reason)

    def _on_worker_dead(self, rec: WorkerRecord, reason: str) -> None:
        if rec.state is WorkerState.STOPPED:
            return
        log.warning("worker %s died: %s", rec.worker_id, reason)
        rec.last_error = reason
        self._stop_worker(rec, f"died: {reason}", count_release=False)
        self.counters["worker_deaths"] += 1
        orphans = sorted(rec.assigned.values(), key=lambda t: t.admitted_at)
        rec.assigned.clear()
        for tr in reversed(orphans):  # pushed to the front: the oldest ends up first
            self._requeue(tr, tr.resume_state(), after_fault=reason)
        self._ensure_min_workers()
        self._fail_queued_if_stranded()
        self._wake.set()

    def cluster_lost(self, reason: str) -> None:
        """Ray's GCS is gone: fail every admitted request now (a worker's death would never be
        reported, so its callers would wait forever) and schedule nothing more."""
        if self.lost is not None:
            return
        self.lost = reason
        self.closing = True
        for task in self._loops:
            task.cancel()
        for tr in list(self.requests.values()):
            tr.fail(reason, "unavailable")
            self._finalize(tr, "requests_failed")
        self._drained.set()

    # ------------------------------------------------------------ reports

    def _on_report(self, rec: WorkerRecord, report: StepReport) -> None:
        if rec.state is WorkerState.STOPPED:
            return
        deliver_report(
            rec,
            report,
            counters=self.counters,
            recent_load_seconds=self.recent_load_seconds,
            finalize=self._finalize,
        )
        if rec.state is WorkerState.DRAINING and not rec.assigned:
            self._stop_worker(rec, "drained")
        if len(self.queue):
            self._wake.set()

    def _finalize(self, tr: TrackedRequest, counter: str) -> None:
        self.counters[counter] += 1
        self.requests.pop(tr.request_id, None)
        self._resume_states.pop(tr.request_id, None)
        self.queue.remove(tr.request_id)
        owner = self.workers.get(tr.owner) if tr.owner is not None else None
        if owner is not None:
            owner.unassign(tr.request_id, self.clock())
        tr.owner = None
        if not self.requests:
            self._drained.set()

    def _fail_queued_if_stranded(self) -> None:
        """Once starting has been given up, queued requests with no worker left to run them fail."""
        if self.start_gave_up is None:
            return
        if any(w.state in (WorkerState.ACTIVE, WorkerState.STARTING) for w in self.workers.values()):
            return
        for pending in list(self.queue):
            tr = self.requests.get(pending.request_id)
            if tr is not None:
                tr.fail(f"no worker could start ({self.start_gave_up})")
                self._finalize(tr, "requests_failed")

    # ------------------------------------------------------------ admission and placement

    def admit(self, tr: TrackedRequest) -> None:
        self.requests[tr.request_id] = tr
        self._drained.clear()
        self.queue.push(PendingRequest.from_request(tr.request))
        self.counters["requests_admitted"] += 1
        if self.start_gave_up is not None and not self._has_active():
            tr.fail(f"no worker could start ({self.start_gave_up})")
            self._finalize(tr, "requests_failed")
            return
        self._wake.set()

    def _has_active(self) -> bool:
        return any(w.state is WorkerState.ACTIVE for w in self.workers.values())

    def _requeue(self, tr: TrackedRequest, state: SequenceState, *, after_fault: str | None = None) -> None:
        tr.owner, tr.migrating = None, False
        if tr.abort_requested:
            tr.finish_aborted()
            self._finalize(tr, "requests_aborted")
            return
        if after_fault is not None:
            tr.resumes += 1
            if tr.resumes > MAX_RESUMES:
                tr.fail(f"its worker failed {tr.resumes} times; last: {after_fault}")
                self._finalize(tr, "requests_failed")
                return
            self.counters["resumed_after_fault"] += 1
        self._resume_states[tr.request_id] = state
        self.queue.push_front(PendingRequest.from_request(tr.request, len(state.output_token_ids)))

    async def _placement_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.place()

    def place(self) -> None:
        if not len(self.queue):
            return
        workers = self.live_workers()
        decisions = self.placement.schedule(self.queue, [w.snapshot() for w in workers])
        batches: dict[str, list[WorkItem]] = defaultdict(list)
        now = self.clock()
        for d in decisions:
            if isinstance(d, Place):
                tr = self.requests[d.request_id]
                state = self._resume_states.pop(d.request_id, None) or SequenceState(tr.request)
                self.workers[d.worker_id].assign(tr, now)
                batches[d.worker_id].append(self._work_item(state))
            elif isinstance(d, Reject):
                tr = self.requests[d.request_id]
                tr.fail(d.reason, "invalid")
                self._finalize(tr, "requests_failed")
            elif isinstance(d, StartWorker):
                self._request_start(d.reason)
        for wid, items in batches.items():
            self._send(self.workers[wid], items)

    def _work_item(self, state: SequenceState) -> WorkItem:
        adapter = state.request.adapter
        return WorkItem(state, self._adapter_path(adapter) if adapter is not None else None)

    def _send(self, rec: WorkerRecord, items: list[WorkItem]) -> None:
        # Submitted now, not from a task: Ray runs one caller's calls to an actor in submission
        # order, so an abort of these requests issued after this line reaches the worker after the
        # add (instead of finding nothing there and letting the sequence run unobserved).
        try:
            ref = rec.handle.add.remote(items)
        except Exception as exc:
            self._on_worker_dead(rec, f"add failed: {short_reason(exc)}")
            return
        self._spawn(self._added(rec, ref), f"add-{rec.worker_id}")

    async def _added(self, rec: WorkerRecord, ref: Any) -> None:
        try:
            results = await ref
        except Exception as exc:
            self._on_worker_dead(rec, f"add failed: {short_reason(exc)}")
            return
        for r in results:
            tr = rec.assigned.get(r.request_id)
            if r.error is None or tr is None:
                continue
            tr.fail(r.error, r.kind or "error")
            self._finalize(tr, "requests_failed")
        self._wake.set()

    # ------------------------------------------------------------ consolidation

    async def _consolidation_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.consolidation_interval_s)
            self.consolidate()

    def consolidate(self) -> None:
        workers = self.live_workers()
        decisions = self.consolidation.plan([w.snapshot() for w in workers], queue_len=len(self.queue))
        moves, releases = group_moves(decisions)
        drain_released(self.workers, releases, self._stop_worker)
        for (source, target), rids in moves.items():
            src = self.workers.get(source)
            dst = self.workers.get(target) if target is not None else None
            if src is not None:
                self._spawn(self._move(src, dst, rids), f"move-{source}")

    async def _move(self, src: WorkerRecord, dst: WorkerRecord | None, rids: list[str]) -> None:
        """Migrate `rids` from `src` to `dst`, or evict them back to the queue when `dst` is None
        (`migration.move`; benchmarks/fleet_migration.py times this call)."""
        await move(self._move_hooks(), src, dst, rids)

    def _move_hooks(self) -> MoveHooks:
        # Built per move, not once in __init__: a handler patched on the instance (as tests do
        # with others) is then the one the move calls, as when this code was inline here.
        return MoveHooks(
            clock=self.clock,
            counters=self.counters,
            requeue=self._requeue,
            finalize=self._finalize,
            worker_dead=self._on_worker_dead,
            stop_worker=self._stop_worker,
            work_item=self._work_item,
            send=self._send,
            wake=self._wake.set,
        )

    # ------------------------------------------------------------ abort

    async def abort(self, request_id: str) -> None:
        tr = self.requests.get(request_id)
        if tr is None or tr.finished:
            return
        tr.abort_requested = True
        if request_id in self.queue:
            tr.finish_aborted()
            self._finalize(tr, "requests_aborted")
            return
        if tr.migrating or tr.owner is None:
            return  # the migration (or resume) finishes it as aborted when it completes
        rec = self.workers.get(tr.owner)
        if rec is not None:
            try:
                await rec.handle.abort.remote([request_id])
            except Exception as exc:  # the worker is gone: nothing left to free there
                log.debug("abort %s on %s: %s", request_id, rec.worker_id, exc)
        if not tr.finished:
            tr.finish_aborted()
            self._finalize(tr, "requests_aborted")
