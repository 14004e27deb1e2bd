"""ConsolidationPolicy unit tests: migrations, idle release, KV-pressure eviction, with a fake clock."""

from __future__ import annotations

from lorafleet.scheduler.consolidation import ConsolidationPolicy
from lorafleet.scheduler.policy_types import (
    Evict,
    Migrate,
    ReleaseWorker,
    RunningSeq,
    WorkerSnapshot,
    WorkerState,
)

BS = 16


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def seqs(wid: str, n: int, *, tokens: int = 20, remaining: int | None = 50, adapter: str | None = None):
    return tuple(RunningSeq(f"{wid}-{i}", adapter, tokens, float(i), remaining) for i in range(n))


def worker(wid: str, running=(), *, max_batch=4, free=100, state=WorkerState.ACTIVE, idle_since=None):
    return WorkerSnapshot(wid, state, tuple(running), max_batch, free, 100, BS, frozenset(), idle_since)


def policy(clock=None, **kw) -> ConsolidationPolicy:
    kw.setdefault("min_workers", 1)
    kw.setdefault("idle_release_s", 10.0)
    return ConsolidationPolicy(clock=clock or FakeClock(), **kw)


def test_lightest_worker_drains_into_busier_one() -> None:
    workers = [worker("a", seqs("a", 1)), worker("b", seqs("b", 2)), worker("c", seqs("c", 1))]
    decisions = policy().plan(workers)
    # a (lightest, first) moves into b (largest batch with room); then c has only targets that are
    # full (b: 3 + ... max 4) -> b takes it too.
    assert decisions == [Migrate("a-0", "a", "b"), Migrate("c-0", "c", "b")]


def test_source_is_drained_completely_or_not_at_all() -> None:
    # b has room for one of a's two sequences only: no partial move.
    workers = [worker("a", seqs("a", 2)), worker("b", seqs("b", 3))]
    assert policy().plan(workers) == []


def test_targets_must_be_at_least_as_busy_and_never_become_sources() -> None:
    workers = [worker("a", seqs("a", 2)), worker("b", seqs("b", 1)), worker("c", seqs("c", 2))]
    # b is lightest: it goes to a (batch 2, first in order); a and c are then left alone because a
    # is a target, and c would need a target with batch >= 2 and room for both: a has 1 slot left.
    assert policy().plan(workers) == [Migrate("b-0", "b", "a")]


def test_kv_room_is_required_on_the_target() -> None:
    workers = [worker("a", seqs("a", 1, tokens=200)), worker("b", seqs("b", 2), free=12)]
    # 200 tokens = 13 blocks + 2 spare > 12 free.
    assert policy().plan(workers) == []


def test_nearly_finished_sequences_are_left_to_finish() -> None:
    workers = [worker("a", seqs("a", 1, remaining=2)), worker("b", seqs("b", 2))]
    assert policy(min_remaining_tokens=4).plan(workers) == []
    assert policy(min_remaining_tokens=2).plan(workers) == [Migrate("a-0", "a", "b")]


def test_migration_budget() -> None:
    workers = [worker("a", seqs("a", 1)), worker("b", seqs("b", 1)), worker("c", seqs("c", 1), max_batch=8)]
    assert len(policy(max_migrations=1).plan(workers)) == 1
    assert policy(max_migrations=0).plan(workers) == []


def test_draining_worker_is_emptied_first_even_into_lighter_workers_then_released() -> None:
    workers = [worker("a", seqs("a", 2), state=WorkerState.DRAINING), worker("b", seqs("b", 1))]
    assert policy().plan(workers) == [Migrate("a-0", "a", "b"), Migrate("a-1", "a", "b")]
    workers = [worker("a", (), state=WorkerState.DRAINING), worker("b", seqs("b", 1))]
    assert policy().plan(workers) == [ReleaseWorker("a", "drained")]


def test_idle_release_after_timeout_keeps_min_workers() -> None:
    clock = FakeClock(100.0)
    p = policy(clock, min_workers=1, idle_release_s=10.0)
    workers = [worker("a", idle_since=95.0), worker("b", idle_since=85.0), worker("c", seqs("c", 1))]
    assert p.plan(workers) == [ReleaseWorker("b", "idle for 15.0 s")]
    clock.t = 106.0
    # Both idle long enough; the one idle longest goes first; c (busy) counts toward min_workers.
    assert [d.worker_id for d in p.plan(workers)] == ["b", "a"]
    assert [d.worker_id for d in policy(clock, min_workers=2).plan(workers)] == ["b"]
    assert policy(clock, min_workers=3).plan(workers) == []


def test_no_idle_release_while_requests_queue() -> None:
    clock = FakeClock(100.0)
    workers = [worker("a", idle_since=0.0), worker("b", seqs("b", 1))]
    assert policy(clock).plan(workers, queue_len=3) == []
    assert policy(clock).plan(workers) == [ReleaseWorker("a", "idle for 100.0 s")]


def test_starting_workers_count_toward_min_workers() -> None:
    workers = [worker("a", idle_since=0.0), worker("b", state=WorkerState.STARTING)]
    assert policy(FakeClock(100.0)).plan(workers) == [ReleaseWorker("a", "idle for 100.0 s")]


def test_kv_pressure_evicts_newest_until_each_sequence_has_a_spare_block() -> None:
    # 4 sequences of 20 tokens (2 blocks each), 1 free block: evict the newest until free >= running.
    running = tuple(RunningSeq(f"s{i}", None, 20, float(t), 50) for i, t in enumerate((3.0, 1.0, 4.0, 2.0)))
    workers = [worker("a", running, free=1)]
    decisions = policy().plan(workers)
    # evict s2 (t=4): free 3, running 3 -> ok.
    assert decisions == [Evict("s2", "a", "1 free KV blocks for 4 sequences")]


def test_kv_pressure_keeps_the_oldest_sequence() -> None:
    running = (RunningSeq("old", None, 20, 1.0, 50), RunningSeq("new", None, 16, 2.0, 50))
    decisions = policy().plan([worker("a", running, free=-5)])
    assert decisions == [Evict("new", "a", "-5 free KV blocks for 2 sequences")]


def test_deterministic_for_same_input() -> None:
    workers = [worker(w, seqs(w, n)) for w, n in (("a", 1), ("b", 3), ("c", 2), ("d", 1))]
    assert policy().plan(workers) == policy().plan(workers)
