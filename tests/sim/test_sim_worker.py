"""SimWorker against the real engine's batching rules, and its closed-form fast-forward."""

from __future__ import annotations

import dataclasses
import random

import pytest

from lorafleet.sim.profile import EngineShape, LatencyProfile
from lorafleet.sim.sequences import RequestRecord, SimSeq
from lorafleet.sim.worker import SimWorker
from lorafleet.worker.batching import Scheduler
from lorafleet.worker.block_allocator import KVBlockAllocator
from lorafleet.worker.sequence import Sequence
from lorafleet.worker.types import Request, SamplingParams


class _AnySlot:
    def can_acquire(self, name: str | None) -> bool:
        return True

    def acquire(self, name: str | None) -> int:
        return 0

    def release(self, name: str | None) -> None:
        pass


def _unit_profile(**engine: int) -> LatencyProfile:
    """Every step takes exactly 1 s, so a finish time is a step count."""
    shape = EngineShape(
        max_batch_size=engine.get("max_batch_size", 4),
        max_num_batched_tokens=engine.get("max_num_batched_tokens", 32),
        block_size=engine.get("block_size", 4),
        num_kv_blocks=engine.get("num_kv_blocks", 40),
        max_loras=engine.get("max_loras", 64),
        max_model_len=512,
        host_cache_adapters=64,
    )
    return LatencyProfile("unit", shape, (0,), (1.0,), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _real_finish_steps(jobs: list[tuple[int, int]], **engine: int) -> tuple[dict[str, int], int]:
    sched = Scheduler(
        KVBlockAllocator(engine["num_kv_blocks"], engine["block_size"]),
        _AnySlot(),
        max_batch_size=engine["max_batch_size"],
        max_num_batched_tokens=engine["max_num_batched_tokens"],
    )
    for i, (prompt, output) in enumerate(jobs):
        req = Request(f"r{i}", tuple([5] * prompt), sampling=SamplingParams(max_new_tokens=output))
        sched.add(Sequence(req, arrival_index=i))
    finish: dict[str, int] = {}
    step = 0
    while sched.running or sched.waiting:
        step += 1
        out = sched.schedule()
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(7)
                if len(seq.output_token_ids) == seq.request.sampling.max_new_tokens:
                    finish[seq.request_id] = step
                    sched.remove(seq)
        assert step < 10_000
    return finish, sched.num_preemptions


def _sim_finish_steps(jobs: list[tuple[int, int]], **engine: int) -> tuple[dict[str, int], int]:
    worker = SimWorker("w", 0, _unit_profile(**engine), 0.0)
    for i, (prompt, output) in enumerate(jobs):
        worker.add(SimSeq(RequestRecord(f"r{i}", 0.0, None, prompt, output), prompt, output, 0.0))
    finish: dict[str, int] = {}
    t = 0.0
    while (phase := worker.plan(t)) is not None:
        t = phase.end
        for seq in worker.end_phase(t):
            finish[seq.record.rid] = round(seq.record.finish)
    assert not worker.owned
    assert worker.free_blocks == engine["num_kv_blocks"]
    return finish, worker.preemptions


@pytest.mark.parametrize("seed", range(6))
def test_same_choices_as_the_engine_scheduler(seed: int) -> None:
    rng = random.Random(seed)
    jobs = [(rng.randint(1, 40), rng.randint(1, 30)) for _ in range(rng.randint(3, 12))]
    engine = {"max_batch_size": 4, "max_num_batched_tokens": 32, "block_size": 4, "num_kv_blocks": 30}
    real, real_preempt = _real_finish_steps(jobs, **engine)
    sim, sim_preempt = _sim_finish_steps(jobs, **engine)
    assert sim == real
    assert sim_preempt == real_preempt


def test_parity_cases_exercise_preemption() -> None:
    # The parity test above is only meaningful if KV pressure actually preempts in some of its cases.
    engine = {"max_batch_size": 4, "max_num_batched_tokens": 32, "block_size": 4, "num_kv_blocks": 30}
    counts = []
    for seed in range(6):
        rng = random.Random(seed)
        jobs = [(rng.randint(1, 40), rng.randint(1, 30)) for _ in range(rng.randint(3, 12))]
        counts.append(_real_finish_steps(jobs, **engine)[1])
    assert sum(counts) > 0


def test_fast_forward_sums_the_steps_it_skips(tiny_profile: LatencyProfile) -> None:
    worker = SimWorker("w", 0, tiny_profile, 0.0)
    for i in range(3):
        worker.add(SimSeq(RequestRecord(f"r{i}", 0.0, f"a{i % 2}", 8, 20 + i), 8, 20 + i, 0.0))
    phase = worker.plan(0.0)
    assert phase is not None and phase.steps == 1  # the prefill step
    worker.end_phase(phase.end)
    start = phase.end
    phase = worker.plan(start)
    assert phase is not None and phase.steps == 19  # decodes until r0 is done
    ctx = sum(s.computed + 1 for s in worker.running)
    expected = sum(tiny_profile.step_s(3, 0, ctx + 3 * j, 2) for j in range(19))
    assert phase.end - start == pytest.approx(expected, rel=1e-12)


def test_a_command_mid_phase_takes_effect_after_the_step_in_progress(tiny_profile: LatencyProfile) -> None:
    worker = SimWorker("w", 0, tiny_profile, 0.0)
    worker.add(SimSeq(RequestRecord("r0", 0.0, None, 4, 50), 4, 50, 0.0))
    first = worker.plan(0.0)
    assert first is not None
    worker.end_phase(first.end)
    phase = worker.plan(first.end)
    assert phase is not None and phase.steps == 49
    one_step = worker.duration(phase, 1)
    now = phase.start + 2.5 * one_step
    end = worker.cut(now)
    assert phase.steps == 3
    assert end == pytest.approx(phase.start + worker.duration(phase, 3))
    assert end >= now


def test_adapter_slots_block_fcfs_and_loads_cost_time(tiny_profile: LatencyProfile) -> None:
    profile = dataclasses.replace(tiny_profile, engine=dataclasses.replace(tiny_profile.engine, max_loras=1))
    worker = SimWorker("w", 0, profile, 0.0)
    worker.add(SimSeq(RequestRecord("r0", 0.0, "a", 4, 5), 4, 5, 0.0))
    worker.add(SimSeq(RequestRecord("r1", 0.0, "b", 4, 5), 4, 5, 0.0))
    phase = worker.plan(0.0)
    assert phase is not None
    assert [s.record.rid for s, _ in phase.scheduled] == ["r0"]  # b has no free slot while a is pinned
    assert phase.end == pytest.approx(profile.step_s(0, 4, 4, 1) + profile.adapter_disk_load_s)
    assert worker.adapter_loads == 1


@pytest.mark.parametrize("seed", range(4))
def test_the_step_in_progress_is_the_first_to_end_at_or_after_the_command(
    tiny_profile: LatencyProfile, seed: int
) -> None:
    rng = random.Random(seed)
    tried = 0
    for _ in range(200):
        worker = SimWorker("w", 0, tiny_profile, 0.0)
        worker.slowdown = rng.choice((1.0, 1.0, 2.5))
        for i in range(rng.randint(1, 4)):
            n, out = rng.randint(1, 15), rng.randint(2, 60)
            worker.add(SimSeq(RequestRecord(f"r{i}", 0.0, f"a{i}", n, out), n, out, 0.0))
        first = worker.plan(0.0)
        assert first is not None
        worker.end_phase(first.end)
        phase = worker.plan(first.end)
        if phase is None or phase.steps == 1:
            continue
        tried += 1
        steps, start = phase.steps, phase.start
        now = start + rng.random() ** 3 * (phase.end - start)
        if rng.random() < 0.2:  # exactly on a step boundary
            now = start + worker.duration(phase, rng.randint(1, steps))
        ends = [start + worker.duration(phase, j) for j in range(1, steps + 1)]
        expected = next((j for j, e in enumerate(ends, 1) if e >= now), steps)
        assert worker.cut(now) == ends[expected - 1]
        assert phase.steps == expected
    assert tried > 150
