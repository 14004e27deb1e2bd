"""FleetRuntime's bookkeeping on a dead worker, without Ray processes: no request waits forever."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")  # runtime.py imports Ray; these tests start no Ray process

from lorafleet.scheduler.fleet_config import FleetConfig
from lorafleet.scheduler.policy_types import WorkerState
from lorafleet.scheduler.runtime import FleetRuntime
from lorafleet.scheduler.tracked_request import Failure, TrackedRequest
from lorafleet.scheduler.worker_record import WorkerRecord
from lorafleet.worker.types import Request, SamplingParams, TokenDelta


def _runtime_with_one_running_request() -> tuple[FleetRuntime, WorkerRecord, TrackedRequest]:
    runtime = FleetRuntime(FleetConfig(model_dir="/m"), lambda name: None)
    rec = WorkerRecord("worker-0", 0, state=WorkerState.ACTIVE)
    runtime.workers[rec.worker_id] = rec
    tr = TrackedRequest(Request("r", (1, 2), None, SamplingParams(max_new_tokens=8)))
    runtime.requests[tr.request_id] = tr
    runtime._drained.clear()
    rec.assign(tr, 0.0)
    tr.deliver(TokenDelta("r", (5,)), 0.0)
    return runtime, rec, tr


def test_requests_of_a_dead_worker_fail_once_no_worker_can_start() -> None:
    async def main() -> None:
        runtime, rec, tr = _runtime_with_one_running_request()
        runtime.start_gave_up = "5 consecutive worker starts failed; last: out of memory"
        runtime._on_worker_dead(rec, "killed")
        assert tr.stream.get_nowait()[0].new_token_ids == (5,)
        failure = tr.stream.get_nowait()
        assert isinstance(failure, Failure) and "no worker could start" in failure.reason
        assert not runtime.requests and len(runtime.queue) == 0
        assert runtime.counters["requests_failed"] == 1
        await asyncio.wait_for(runtime._drained.wait(), 1.0)  # a drain would not hang on it

    asyncio.run(main())


def test_a_drain_still_starts_the_worker_its_requests_need(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        runtime, rec, tr = _runtime_with_one_running_request()
        started: list[str] = []

        async def start_worker(new: WorkerRecord) -> None:
            started.append(new.worker_id)

        monkeypatch.setattr(runtime, "_start_worker", start_worker)
        drain = asyncio.ensure_future(runtime.shutdown(drain=True))
        await asyncio.sleep(0)
        runtime._on_worker_dead(rec, "killed")
        await asyncio.sleep(0)
        assert len(started) == 1  # the resumed request gets a worker to finish on
        assert [p.request_id for p in runtime.queue] == ["r"] and not drain.done()
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
        await runtime.shutdown(drain=False)
        assert tr.finished

    asyncio.run(main())


def test_the_fleet_configs_batch_target_reaches_both_policies() -> None:
    runtime = FleetRuntime(FleetConfig(model_dir="/m", pack_batch_target=12), lambda name: None)
    assert runtime.placement.batch_target == 12 and runtime.consolidation.batch_target == 12
    plain = FleetRuntime(FleetConfig(model_dir="/m"), lambda name: None)
    assert plain.placement.batch_target is None and plain.consolidation.batch_target is None
