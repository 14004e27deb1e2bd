"""Consolidation and faults through the runtime: migrations, releases, a killed worker; same outputs."""

from __future__ import annotations

import asyncio

import pytest

ray = pytest.importorskip("ray")  # the GPU image may lack Ray

from lorafleet.scheduler.fleet import Fleet  # noqa: E402
from lorafleet.worker.types import Request, SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_local")


def make_requests(prefix: str, names: list[str], lengths: list[int]) -> tuple[list[Request], list, list]:
    prompts = [[7 + 3 * i, 11, 2 + i, 19][: 3 + i % 2] for i in range(len(lengths))]
    adapters = [[*names, None][i % (len(names) + 1)] for i in range(len(lengths))]
    requests = [
        Request(f"{prefix}{i}", tuple(p), a, SamplingParams(n, 0.0, ignore_eos=True))
        for i, (p, a, n) in enumerate(zip(prompts, adapters, lengths))
    ]
    return requests, prompts, adapters


def test_consolidation_migrates_and_releases_with_outputs_unchanged(
    fleet_config, offline, register_all, run_async, wait_for, collector
):
    config = fleet_config(
        min_workers=3,
        max_workers=3,
        consolidation_interval_s=0.3,
        idle_release_s=0.3,
        min_remaining_tokens=1,
    )

    async def main():
        fleet = await Fleet.start(config)
        try:
            names = register_all(fleet)
            # Packing at batch 2 spreads these over the three workers, one long and one short each.
            lengths = [440, 16, 440, 16, 440, 16]
            requests, prompts, adapters = make_requests("c", names, lengths)
            collectors = [collector(fleet, r) for r in requests]
            await wait_for(lambda: sum(w.num_running for w in fleet.status().workers) == 6)
            assert sorted(w.num_running for w in fleet.status().workers) == [2, 2, 2]
            fleet.set_worker_bounds(min_workers=1)  # now an idle worker may be released
            await wait_for(
                lambda: fleet.status().counters.workers_released >= 1 or all(c.done for c in collectors)
            )
            status = fleet.status()
            await asyncio.gather(*(c.task for c in collectors))
            expected = offline(prompts, adapters, lengths)
            assert [c.tokens for c in collectors] == [list(e) for e in expected]
            assert status.counters.worker_starts == 3
            assert status.counters.migrations >= 1
            assert status.counters.workers_released >= 1
        finally:
            await fleet.shutdown()

    run_async(main())


def test_killed_worker_requests_resume_elsewhere_with_outputs_unchanged(
    fleet_config, offline, register_all, run_async, wait_for, collector
):
    async def main():
        fleet = await Fleet.start(fleet_config(min_workers=2, max_workers=2, engine={"max_batch_size": 4}))
        try:
            names = register_all(fleet)
            lengths = [300, 250, 280, 200, 260, 240]
            requests, prompts, adapters = make_requests("f", names, lengths)
            collectors = [collector(fleet, r) for r in requests]
            await wait_for(lambda: all(len(c.tokens) >= 3 for c in collectors))
            runtime = fleet._runtime
            victim = max(runtime.live_workers(), key=lambda w: len(w.assigned))
            assert victim.assigned, "expected the victim to hold running requests"
            ray.kill(victim.handle, no_restart=True)
            await asyncio.gather(*(c.task for c in collectors))
            expected = offline(prompts, adapters, lengths)
            assert [c.tokens for c in collectors] == [list(e) for e in expected]
            counters = fleet.status().counters
            assert counters.worker_deaths == 1
            assert counters.resumed_after_fault >= 1
            assert counters.requests_completed == len(requests)
            await wait_for(lambda: len(fleet.status().workers) == 2)  # min_workers restored
        finally:
            await fleet.shutdown()

    run_async(main())


def test_kv_pressure_evicts_and_replaces_with_outputs_unchanged(
    fleet_config, offline, register_all, run_async, wait_for, collector
):
    # 14 blocks of 16 tokens per worker: three 184-token sequences packed on one worker outgrow it.
    config = fleet_config(
        min_workers=2,
        max_workers=2,
        engine={"max_batch_size": 4, "num_kv_blocks": 14},
        consolidation_interval_s=0.2,
        min_remaining_tokens=1,
    )

    async def main():
        fleet = await Fleet.start(config)
        try:
            names = register_all(fleet)
            lengths = [180, 180, 180]
            requests, prompts, adapters = make_requests("k", names, lengths)
            collectors = [collector(fleet, r) for r in requests]
            await wait_for(lambda: sum(w.num_running for w in fleet.status().workers) == 3)
            assert sorted(w.num_running for w in fleet.status().workers) == [0, 3]  # packed
            await asyncio.gather(*(c.task for c in collectors))
            expected = offline(prompts, adapters, lengths)
            assert [c.tokens for c in collectors] == [list(e) for e in expected]
            assert fleet.status().counters.evictions >= 1
        finally:
            await fleet.shutdown()

    run_async(main())
