"""The Ray watchdog and what the fleet does once its cluster is lost (no Ray processes started)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest

ray = pytest.importorskip("ray")  # runtime.py imports Ray; these tests start no Ray process

from lorafleet.scheduler.adapter_registry import AdapterRegistry  # noqa: E402
from lorafleet.scheduler.errors import ClusterLostError  # noqa: E402
from lorafleet.scheduler.fleet import Fleet  # noqa: E402
from lorafleet.scheduler.fleet_config import FleetConfig  # noqa: E402
from lorafleet.scheduler.policy_types import WorkerState  # noqa: E402
from lorafleet.scheduler.ray_watchdog import RayWatchdog, gcs_probe  # noqa: E402
from lorafleet.scheduler.runtime import FleetRuntime  # noqa: E402
from lorafleet.scheduler.tracked_request import TrackedRequest  # noqa: E402
from lorafleet.scheduler.worker_record import WorkerRecord  # noqa: E402
from lorafleet.serving.server import status_for  # noqa: E402
from lorafleet.worker.engine_config import EngineConfig  # noqa: E402
from lorafleet.worker.types import Request, SamplingParams, TokenDelta  # noqa: E402


class Probe:
    """Answers from a script: None = success, an exception = that failure, "hang" = blocks."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.calls = 0
        self.release = threading.Event()

    def __call__(self) -> None:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if step == "hang":
            self.release.wait(10)
        elif step is not None:
            raise step


def _run_watchdog(probe: Probe, lost_after_s: float, limit_s: float = 5.0) -> tuple[list[str], float]:
    lost: list[str] = []

    async def main() -> float:
        dog = RayWatchdog(probe, lost.append, interval_s=0.05, lost_after_s=lost_after_s)
        started = time.monotonic()
        await asyncio.wait_for(dog.run(), limit_s)
        return time.monotonic() - started

    return lost, asyncio.run(main())


def test_lost_after_the_bound_with_the_last_error() -> None:
    probe = Probe([None, None, ConnectionRefusedError(111, "Connection refused")])
    lost, took = _run_watchdog(probe, lost_after_s=0.3)
    assert len(lost) == 1 and "GCS did not answer" in lost[0] and "Connection refused" in lost[0]
    assert 0.3 <= took < 2.0


def test_a_blip_shorter_than_the_bound_is_survived() -> None:
    refused = ConnectionRefusedError(111, "refused")
    probe = Probe([None, refused, refused, None, None, None, None, None, None, None, refused])
    lost, _ = _run_watchdog(probe, lost_after_s=0.3)
    assert probe.calls >= 12  # it went on probing after the blip, and only the long outage counts
    assert len(lost) == 1


def test_a_hanging_probe_never_blocks_the_loop_or_piles_up_threads() -> None:
    probe = Probe(["hang"])
    try:
        lost, took = _run_watchdog(probe, lost_after_s=0.3)
    finally:
        probe.release.set()
    assert probe.calls == 1  # one probe thread, still waited on, not one per interval
    assert len(lost) == 1 and "no answer within" in lost[0]
    assert took < 2.0


def test_watchdog_refuses_bad_bounds() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        RayWatchdog(lambda: None, lambda reason: None, interval_s=0, lost_after_s=1)


def test_gcs_probe_fails_fast_on_a_closed_port_and_passes_on_an_open_one() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        gcs_probe(f"127.0.0.1:{listener.getsockname()[1]}", timeout_s=1.0)()  # no Ray client here
        port = listener.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        gcs_probe(f"127.0.0.1:{port}", timeout_s=1.0)()
    assert time.monotonic() - started < 1.0


def _fleet_with_requests() -> tuple[Fleet, FleetRuntime, list[TrackedRequest]]:
    config = FleetConfig(model_dir="/m")
    runtime = FleetRuntime(config, lambda name: None)
    rec = WorkerRecord("worker-0", 0, state=WorkerState.ACTIVE, handle=object())
    runtime.workers[rec.worker_id] = rec
    fleet = Fleet(config, runtime, AdapterRegistry(EngineConfig(), None), owns_ray=False)
    running = TrackedRequest(Request("run", (1, 2), None, SamplingParams(max_new_tokens=8)))
    queued = TrackedRequest(Request("wait", (3,), None, SamplingParams(max_new_tokens=8)))
    for tr in (running, queued):
        runtime.admit(tr)
    runtime.queue.remove("run")
    rec.assign(running, 0.0)
    running.deliver(TokenDelta("run", (5,)), 0.0)
    return fleet, runtime, [running, queued]


def test_a_lost_cluster_fails_every_request_unavailable_and_refuses_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    killed: list[object] = []
    monkeypatch.setattr(ray, "kill", lambda handle, **kw: killed.append(handle))

    async def consume(fleet: Fleet, tr: TrackedRequest) -> BaseException | None:
        # What Fleet.generate raises for this request's stream (its admission is already done).
        item = await tr.stream.get()
        while isinstance(item, tuple):
            item = await tr.stream.get()
        return fleet._error(tr.request_id, item)

    async def main() -> None:
        fleet, runtime, trs = _fleet_with_requests()
        fleet._on_ray_lost("the Ray cluster's GCS did not answer for 15 s (last error: refused)")
        errors = [await consume(fleet, tr) for tr in trs]
        for error in errors:
            assert isinstance(error, ClusterLostError) and "lost the Ray cluster" in str(error)
            assert status_for(error) is grpc.StatusCode.UNAVAILABLE
        assert not runtime.requests and len(runtime.queue) == 0
        assert runtime.counters["requests_failed"] == 2
        assert await asyncio.wait_for(fleet.wait_lost(), 1.0) == fleet.lost_reason
        with pytest.raises(ClusterLostError, match="lost the Ray cluster"):
            await anext(fleet.generate(Request("new", (1,), None, SamplingParams(max_new_tokens=2))))
        assert runtime._request_start("below min_workers") is None  # no Ray call can work now
        await fleet.shutdown(drain=False)  # returns: it neither waits for nor kills the workers
        assert killed == []

    asyncio.run(main())


def test_worker_actors_are_created_without_task_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's GCS would keep every actor call's task events (soak: ~2 MB/min of GCS growth)."""
    seen: dict[str, object] = {}

    class Remote:
        def options(self, **options: object) -> Remote:
            seen.update(options)
            return self

        def remote(self, *args: object) -> object:
            raise RuntimeError("no Ray here")

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())

    async def main() -> None:
        runtime = FleetRuntime(FleetConfig(model_dir="/m", max_start_attempts=1), lambda name: None)
        rec = WorkerRecord("worker-0", 0)
        await runtime._start_worker(rec)
        assert runtime.start_gave_up is not None and "no Ray here" in runtime.start_gave_up

    asyncio.run(main())
    assert seen.get("enable_task_events") is False
