"""Delivering one worker's step report: its engine figures to the worker's record, each delta to
the stream of the request it belongs to.

Only requests the reporting worker owns count (`rec.assigned`): a report that arrives after a
request was exported, resumed elsewhere or finished is ignored for it, which is what keeps a
migrated request's tokens from being delivered twice (see `runtime.py`'s invariants).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lorafleet.worker.types import FinishReason

if TYPE_CHECKING:
    from collections import deque

    from lorafleet.scheduler.tracked_request import TrackedRequest
    from lorafleet.scheduler.worker_actor import StepReport
    from lorafleet.scheduler.worker_record import WorkerRecord


def deliver_report(
    rec: WorkerRecord,
    report: StepReport,
    *,
    counters: dict[str, float],
    recent_load_seconds: deque[float],
    finalize: Callable[[TrackedRequest, str], None],
) -> None:
    """Apply `report` from `rec`'s worker; a request it finishes (or fails) goes to `finalize`
    with the counter it counts under, at once, so a later delta of the same report skips it."""
    rec.stats = report.stats
    if report.stats.adapter_load_seconds:
        recent_load_seconds.extend(report.stats.adapter_load_seconds)
        counters["adapter_load_seconds_sum"] += sum(report.stats.adapter_load_seconds)
        counters["adapter_load_count"] += len(report.stats.adapter_load_seconds)
    for delta, produced_at in zip(report.deltas, report.produced_at):
        tr = rec.assigned.get(delta.request_id)
        if tr is None or tr.finished:
            continue  # not (or no longer) this worker's: e.g. exported, resumed elsewhere
        if delta.finish_reason is FinishReason.ERROR:
            tr.fail(delta.error or "the engine failed the request")
            finalize(tr, "requests_failed")
            continue
        tr.deliver(delta, produced_at)
        counters["tokens_generated"] += len(delta.new_token_ids)
        if delta.finish_reason is not None:
            done = "requests_aborted" if delta.finish_reason is FinishReason.ABORT else "requests_completed"
            finalize(tr, done)
