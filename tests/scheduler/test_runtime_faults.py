"""A worker SIGKILLed inside an adapter load, or inside a migration (on its source during the export,
on its target during the resume): no request is lost and the greedy tokens equal the offline run.

The kills land deterministically through the worker's fault points (`lorafleet.worker.fault_points`):
this module's Ray is started with `LORAFLEET_FAULT_DELAYS`, so its workers pause at those points,
and each pause first drops a mark file naming the worker's pid, which the test then kills.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # the GPU image may lack Ray

from lorafleet.scheduler.fleet import Fleet  # noqa: E402
from lorafleet.worker import fault_points  # noqa: E402
from lorafleet.worker.types import Request, SamplingParams  # noqa: E402

SLOW = "slow-adapter"  # a second name for adapter-1's files: its disk load is the slow one
DELAYS = f"adapter_load:{SLOW}=6,export=4,resume=4"


@pytest.fixture(scope="module")
def marks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Ray of this module's own whose workers pause at the fault points and mark each pause."""
    mark_dir = tmp_path_factory.mktemp("fault-marks")
    saved = {k: os.environ.get(k) for k in (fault_points.ENV_DELAYS, fault_points.ENV_MARK_DIR)}
    # Ray's processes take the environment of the process that starts it, and keep it.
    os.environ[fault_points.ENV_DELAYS] = DELAYS
    os.environ[fault_points.ENV_MARK_DIR] = str(mark_dir)
    try:
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield mark_dir
    finally:
        ray.shutdown()


def greedy_request(rid: str, prompt: list[int], adapter: str | None, n: int) -> Request:
    return Request(rid, tuple(prompt), adapter, SamplingParams(n, 0.0, ignore_eos=True))


async def wait_for_mark(mark_dir: Path, point: str, timeout_s: float = 60.0) -> int:
    """The pid of the first worker that entered `point`'s pause."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        found = sorted(mark_dir.glob(f"{point}.*"))
        if found:
            return int(found[0].suffix[1:])
        await asyncio.sleep(0.01)
    raise AssertionError(f"no worker entered the {point} fault point within {timeout_s:g} s")


def clear_marks(mark_dir: Path) -> None:
    for mark in mark_dir.iterdir():
        mark.unlink()


def assert_idle(fleet: Fleet) -> None:
    """Nothing about the finished requests is left in the head's bookkeeping (no leak by fault)."""
    sizes = fleet.bookkeeping_sizes()
    assert [sizes[k] for k in ("requests", "queue", "resume_states", "assigned")] == [0, 0, 0, 0], sizes


def victim_of(fleet: Fleet, pid: int):
    found = [w for w in fleet._runtime.live_workers() if w.info is not None and w.info.pid == pid]
    assert len(found) == 1, f"no live worker has pid {pid}"
    return found[0]


def test_worker_killed_inside_an_adapter_load_loses_nothing(
    marks, demo, fleet_config, offline, register_all, run_async, wait_for, collector
):
    async def main():
        clear_marks(marks)
        fleet = await Fleet.start(fleet_config(min_workers=2, max_workers=2, engine={"max_batch_size": 4}))
        try:
            register_all(fleet)
            fleet.register_adapter(SLOW, str(demo.adapters["adapter-1"]), confined=False)
            # Packing fills one worker (4) and puts 2 on the other, which then takes the slow one.
            jobs = [([7 + i, 11, 2 + i, 19], f"adapter-{i % 3}" if i % 4 else None, 150) for i in range(6)]
            requests = [greedy_request(f"a{i}", p, a, n) for i, (p, a, n) in enumerate(jobs)]
            collectors = [collector(fleet, r) for r in requests]
            await wait_for(lambda: all(len(c.tokens) >= 3 for c in collectors), timeout=120)
            slow_job = ([5, 17, 42, 99], SLOW, 60)
            collectors.append(collector(fleet, greedy_request("slow", *slow_job)))
            pid = await wait_for_mark(marks, "adapter_load")
            victim = victim_of(fleet, pid)
            assert "slow" in victim.assigned, "the slow adapter's load is not on the killed worker"
            mid_stream = [tr for tr in victim.assigned.values() if tr.tokens and not tr.finished]
            assert mid_stream, "expected requests mid-stream on the killed worker"
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*(c.task for c in collectors)), 240)
            expected = offline(
                [p for p, _, _ in jobs] + [slow_job[0]],
                [a for _, a, _ in jobs] + ["adapter-1"],  # the same files under their first name
                [n for _, _, n in jobs] + [slow_job[2]],
            )
            assert [c.tokens for c in collectors] == [list(e) for e in expected]
            counters = fleet.status().counters
            assert counters.worker_deaths == 1
            assert counters.resumed_after_fault >= len(mid_stream)
            assert counters.requests_completed == len(collectors)
            assert counters.requests_failed == 0
            assert_idle(fleet)
        finally:
            await fleet.shutdown()

    run_async(main(), timeout=420)


@pytest.mark.parametrize("kill", ["source", "target"])
def test_worker_killed_inside_a_migration_loses_nothing(
    kill, marks, fleet_config, offline, register_all, run_async, wait_for, collector
):
    """Batch 2, two workers, each with one long and one short request: once the short ones end the
    consolidation pass drains one worker into the other, and the kill lands in that migration."""
    config = fleet_config(
        min_workers=2,
        max_workers=2,
        engine={"max_batch_size": 2},
        consolidation_interval_s=0.3,
        min_remaining_tokens=1,
    )

    async def main():
        clear_marks(marks)
        fleet = await Fleet.start(config)
        try:
            names = register_all(fleet)
            jobs = [([9, 4, 33], names[0], 260), ([21, 8], None, 10), ([3, 14, 15, 92], names[1], 260)]
            jobs.append(([65, 35, 89], names[2], 10))
            requests = [greedy_request(f"m{i}", p, a, n) for i, (p, a, n) in enumerate(jobs)]
            collectors = [collector(fleet, r) for r in requests]
            await wait_for(lambda: sorted(w.num_running for w in fleet.status().workers) == [2, 2], 120)
            pid = await wait_for_mark(marks, "export" if kill == "source" else "resume", 120)
            victim = victim_of(fleet, pid)
            moving = [tr for tr in fleet._runtime.requests.values() if tr.tokens and not tr.finished]
            assert moving, "expected long requests mid-stream"
            if kill == "source":
                assert any(tr.migrating for tr in victim.assigned.values()), "no export in flight"
            else:
                assert fleet.status().counters.migrations == 1
                assert victim.assigned, "the migration's target holds no request"
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*(c.task for c in collectors)), 240)
            expected = offline([p for p, _, _ in jobs], [a for _, a, _ in jobs], [n for _, _, n in jobs])
            assert [c.tokens for c in collectors] == [list(e) for e in expected]
            counters = fleet.status().counters
            assert counters.worker_deaths == 1
            assert counters.resumed_after_fault >= 1
            assert counters.requests_completed == len(collectors)
            assert counters.requests_failed == 0
            assert_idle(fleet)
        finally:
            await fleet.shutdown()

    run_async(main(), timeout=420)
