"""Carrying out a consolidation pass on the Ray fleet: draining released workers, and moving
sequences between workers (export from the source, hand the state to the target) or evicting them
back to the queue.

The policy decides what moves (`consolidation.py`); this module only executes it. It holds no fleet
state: the runtime passes the workers involved and, as `MoveHooks`, its own handlers for what a
move changes elsewhere (counters, the queue, a worker's death), so every change to the fleet still
goes through the one place that keeps its invariants (see `runtime.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafleet.scheduler.errors import short_reason
from lorafleet.scheduler.policy_types import ReleaseWorker, WorkerState

if TYPE_CHECKING:
    from lorafleet.scheduler.tracked_request import TrackedRequest
    from lorafleet.scheduler.worker_actor import WorkItem
    from lorafleet.scheduler.worker_record import WorkerRecord
    from lorafleet.worker.types import SequenceState


@dataclass(frozen=True)
class MoveHooks:
    """The runtime's handlers a move calls (`FleetRuntime._move_hooks` builds them per move)."""

    clock: Callable[[], float]
    counters: dict[str, float]
    requeue: Callable[[TrackedRequest, SequenceState], None]  # back to the front of the queue
    finalize: Callable[[TrackedRequest, str], None]  # the request is done; counts it under the name
    worker_dead: Callable[[WorkerRecord, str], None]
    stop_worker: Callable[[WorkerRecord, str], None]
    work_item: Callable[[SequenceState], WorkItem]
    send: Callable[[WorkerRecord, list[WorkItem]], None]  # add the items to the worker's engine
    wake: Callable[[], None]  # run a placement pass: a move may free capacity or queue requests


def drain_released(
    workers: dict[str, WorkerRecord],
    releases: Iterable[ReleaseWorker],
    stop_worker: Callable[[WorkerRecord, str], None],
) -> None:
    """Released workers take no new work; an empty one stops now, the others once their last
    request leaves (a report or a move stops them then)."""
    for d in releases:
        rec = workers.get(d.worker_id)
        if rec is not None and rec.state is not WorkerState.STOPPED:
            rec.state = WorkerState.DRAINING
            if not rec.assigned:
                stop_worker(rec, d.reason)


async def move(hooks: MoveHooks, src: WorkerRecord, dst: WorkerRecord | None, rids: list[str]) -> None:
    """Migrate `rids` from `src` to `dst`, or evict them back to the queue when `dst` is None."""
    trs = [tr for rid in rids if (tr := src.assigned.get(rid)) is not None and not tr.migrating]
    if not trs:
        return
    for tr in trs:
        tr.migrating = True
    try:
        states = await src.handle.export.remote([tr.request_id for tr in trs])
    except Exception as exc:
        for tr in trs:
            tr.migrating = False
        hooks.worker_dead(src, f"export failed: {short_reason(exc)}")
        return
    exported = {s.request.request_id: s for s in states}
    items: list[WorkItem] = []
    now = hooks.clock()
    for tr in trs:
        tr.migrating = False
        state = exported.get(tr.request_id)
        if state is None or tr.owner != src.worker_id or tr.finished:
            continue  # it finished on the source; its final delta is in the source's stream
        try:
            missing = tr.catch_up(state)
        except RuntimeError as exc:  # already off the source: fail it rather than lose it
            tr.fail(str(exc))
            hooks.finalize(tr, "requests_failed")
            continue
        if missing is not None:
            tr.deliver(missing, time.time())
            hooks.counters["tokens_generated"] += len(missing.new_token_ids)
        src.unassign(tr.request_id, now)
        if dst is None or dst.state is not WorkerState.ACTIVE or tr.abort_requested:
            hooks.counters["evictions" if dst is None else "requeued_migrations"] += 1
            hooks.requeue(tr, state)
            continue
        dst.assign(tr, now)
        items.append(hooks.work_item(state))
        hooks.counters["migrations"] += 1
    if src.state is WorkerState.DRAINING and not src.assigned:
        hooks.stop_worker(src, "drained")
    if items and dst is not None:
        hooks.send(dst, items)
    hooks.wake()
