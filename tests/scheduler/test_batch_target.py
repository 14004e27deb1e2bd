"""The placement batch target (`PlacementPolicy(batch_target=N)`): fill workers to N, overflow into the
engine's headroom while the fleet grows."""

from __future__ import annotations

import random

import pytest

from lorafleet.scheduler.policy import (
    LeastLoadedPolicy,
    PlacementPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_placement_policy,
)
from lorafleet.scheduler.policy_types import (
    Place,
    Queue,
    StartWorker,
    WorkerSnapshot,
    WorkerState,
    blocks_for,
)
from tests.scheduler.test_policy import places, queue_of, req, worker


def starts(decisions) -> int:
    return sum(isinstance(d, StartWorker) for d in decisions)


def test_packing_fills_each_worker_to_the_target_before_the_next() -> None:
    workers = [worker("a", 0, max_batch=8), worker("b", 1, max_batch=8)]
    q = queue_of(*(req(f"r{i}") for i in range(4)))
    got = places(PlacementPolicy(batch_target=3).schedule(q, workers))
    # b (1) -> 3 reaches the target; then a, the only worker below it, fills.
    assert got == [("r0", "b"), ("r1", "b"), ("r2", "a"), ("r3", "a")]


def test_past_the_target_the_emptiest_worker_takes_the_overflow_and_the_fleet_grows_once() -> None:
    workers = [worker("a", 4, max_batch=8, free=60), worker("b", 5, max_batch=8), worker("c", 4, free=90)]
    q = queue_of(*(req(f"r{i}") for i in range(3)))
    decisions = PlacementPolicy(max_workers=4, batch_target=4).schedule(q, workers)
    # Every worker is at 4 or more: the smallest batch, then the most free blocks, takes each one
    # (r2: all three at 5, b has the most free blocks).
    assert places(decisions) == [("r0", "c"), ("r1", "a"), ("r2", "b")]
    assert starts(decisions) == 1 and isinstance(decisions[0], StartWorker)
    assert "batch target of 4" in decisions[0].reason
    assert len(q) == 0


def test_overflow_without_growth_when_the_fleet_is_at_its_size_or_a_worker_is_starting() -> None:
    full = [worker("a", 2, max_batch=8)]
    decisions = PlacementPolicy(max_workers=1, batch_target=2).schedule(queue_of(req("r")), full)
    assert places(decisions) == [("r", "a")] and starts(decisions) == 0
    starting = [*full, worker("b", state=WorkerState.STARTING)]
    decisions = PlacementPolicy(max_workers=3, batch_target=2).schedule(queue_of(req("r")), starting)
    assert places(decisions) == [("r", "a")] and starts(decisions) == 0


def test_at_the_engine_limit_the_request_queues_and_asks_for_one_worker() -> None:
    workers = [worker("a", 7, max_batch=8)]
    q = queue_of(req("r0"), req("r1"))
    decisions = PlacementPolicy(max_workers=2, batch_target=4).schedule(q, workers)
    assert places(decisions) == [("r0", "a")]
    assert isinstance(decisions[-1], Queue) and decisions[-1].request_id == "r1"
    assert starts(decisions) == 1  # one per pass, though both the overflow and the queue want one
    assert [r.request_id for r in q] == ["r1"]


@pytest.mark.parametrize("cls", [LeastLoadedPolicy, RoundRobinPolicy, RandomPolicy])
def test_baselines_use_workers_below_the_target_first(cls: type[PlacementPolicy]) -> None:
    # c is below the target of 3 and a, b are not: every policy puts the first request on c.
    workers = [worker("a", 3), worker("b", 4), worker("c", 1)]
    got = places(cls(batch_target=3).schedule(queue_of(req("r0")), workers))
    assert got == [("r0", "c")]


def test_a_target_at_the_engine_limit_changes_nothing() -> None:
    rng = random.Random(3)
    for _ in range(30):
        workers = [worker(f"w{i}", rng.randint(0, 4), max_batch=4, free=rng.randint(0, 40)) for i in range(6)]
        requests = [req(f"r{k}", rng.randint(1, 60), rng.choice([None, "x", "y"])) for k in range(20)]
        for name in ("packing", "least_loaded", "round_robin", "random"):
            plain = make_placement_policy(name, max_workers=8).schedule(queue_of(*requests), workers)
            capped = make_placement_policy(name, max_workers=8, batch_target=4).schedule(
                queue_of(*requests), workers
            )
            assert capped == plain


def _scan(model: list[dict], adapter: str | None, prompt_len: int, target: int) -> str | None:
    """Packing with a target written as a plain scan: the largest batch below the target (adapter
    resident, then fewer free blocks, then order); else the smallest batch up to the limit (most
    free blocks, then order)."""

    def fits(w: dict) -> bool:
        return w["batch"] < w["max"] and w["free"] >= blocks_for(prompt_len, w["bs"]) + w["batch"]

    below = [(i, w) for i, w in enumerate(model) if fits(w) and w["batch"] < target]
    if below:
        return min(
            below, key=lambda iw: (-iw[1]["batch"], adapter not in iw[1]["res"], iw[1]["free"], iw[0])
        )[1]["id"]
    over = [(i, w) for i, w in enumerate(model) if fits(w)]
    if over:
        return min(over, key=lambda iw: (iw[1]["batch"], -iw[1]["free"], -iw[0]))[1]["id"]
    return None


@pytest.mark.parametrize("seed", range(6))
def test_indexed_packing_with_a_target_matches_a_plain_scan(seed: int) -> None:
    rng = random.Random(seed)
    adapters = [f"ad{i}" for i in range(5)]
    snaps: list[WorkerSnapshot] = []
    model = []
    for i in range(30):
        mx = rng.randint(2, 8)
        batch, free, bs = rng.randint(0, mx), rng.randint(0, 40), rng.choice((8, 16))
        res = frozenset(rng.sample(adapters, rng.randint(0, 2)))
        snaps.append(
            worker(f"w{i}", batch, max_batch=mx, free=free, total=64, resident=tuple(res), block_size=bs)
        )
        model.append({"id": f"w{i}", "batch": batch, "max": mx, "free": free, "bs": bs, "res": set(res)})
    target = rng.randint(1, 6)
    requests = [req(f"r{k}", rng.randint(1, 50), rng.choice([None, *adapters])) for k in range(120)]
    decisions = PlacementPolicy(batch_target=target).schedule(queue_of(*requests), snaps)
    placed = dict(places(decisions))
    overflowed = 0
    for r in requests:
        expect = _scan(model, r.adapter, r.prompt_len, target)
        if expect is None:
            assert r.request_id not in placed
            break
        assert placed[r.request_id] == expect, r.request_id
        w = next(m for m in model if m["id"] == expect)
        overflowed += w["batch"] >= target
        w["free"] -= blocks_for(r.prompt_len, w["bs"])
        w["batch"] += 1
        if r.adapter:
            w["res"].add(r.adapter)
    assert any(isinstance(d, Place) for d in decisions)
    if seed == 0:
        assert overflowed  # the random fleets reach the overflow path


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "16"])
def test_a_bad_batch_target_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="batch_target must be an integer >= 1 or None"):
        PlacementPolicy(batch_target=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_target"):
        make_placement_policy("random", batch_target=bad)  # type: ignore[arg-type]
