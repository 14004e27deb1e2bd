"""A PlacementIndex kept across passes (refresh / append) holds exactly what a rebuild would."""

from __future__ import annotations

import random

import pytest

from lorafleet.scheduler.placement_index import PlacementIndex
from lorafleet.scheduler.policy_types import RunningSeq, WorkerSnapshot, WorkerState


def _snap(rng: random.Random, wid: str) -> WorkerSnapshot:
    max_batch = rng.choice((4, 8))
    running = rng.randint(0, max_batch)
    seqs = tuple(RunningSeq(f"{wid}-{i}", None, 10, 0.0) for i in range(running))
    total = rng.choice((64, 128))
    adapters = frozenset(f"a{i}" for i in rng.sample(range(6), rng.randint(0, 3)))
    block = rng.choice((8, 16))
    return WorkerSnapshot(
        wid, WorkerState.ACTIVE, seqs, max_batch, rng.randint(0, total), total, block, adapters
    )


def _state(index: PlacementIndex) -> tuple:
    slots = [
        (s.worker_id, s.batch, s.free, s.total, s.block_size, frozenset(s.resident)) for s in index.slots
    ]
    levels = {b: {bs: list(e) for bs, e in g.items() if e} for b, g in index._levels.items()}
    resident = {a: set(o) for a, o in index._resident.items() if o}
    return slots, levels, index._level_keys, resident, index.max_total_blocks


@pytest.mark.parametrize("seed", range(5))
def test_refresh_and_append_match_a_rebuild(seed: int) -> None:
    rng = random.Random(seed)
    snaps = [_snap(rng, f"w{i}") for i in range(12)]
    index = PlacementIndex(snaps)
    for step in range(60):
        # A pass's own placements change the working copy; refreshing must undo them too.
        for _ in range(3):
            slot = index.best_packing(f"a{rng.randrange(6)}", rng.randint(1, 40))
            if slot is not None:
                index.assign(slot, f"a{rng.randrange(6)}", 8)
        if step % 10 == 9:
            snaps.append(_snap(rng, f"w{len(snaps)}"))
            index.append(snaps[-1])
        for i in rng.sample(range(len(snaps)), 4):
            snaps[i] = _snap(rng, snaps[i].worker_id)
            index.refresh(snaps[i])
        touched = {s.worker_id for s in index.slots if s.resident != snaps[s.order].resident_adapters}
        for wid in touched:  # the simulator refreshes every worker placed on
            index.refresh(snaps[index.by_id[wid].order])
        for s in index.slots:
            if (s.batch, s.free) != (snaps[s.order].num_running, snaps[s.order].free_kv_blocks):
                index.refresh(snaps[s.order])
        assert _state(index) == _state(PlacementIndex(snaps))
        for _ in range(5):
            adapter, prompt = f"a{rng.randrange(6)}", rng.randint(1, 60)
            a, b = index.best_packing(adapter, prompt), PlacementIndex(snaps).best_packing(adapter, prompt)
            assert (a and a.worker_id) == (b and b.worker_id)


def test_refresh_refuses_a_worker_that_left_the_active_set() -> None:
    rng = random.Random(0)
    snap = _snap(rng, "w0")
    index = PlacementIndex([snap])
    draining = WorkerSnapshot("w0", WorkerState.DRAINING, (), 4, 10, 64, 16)
    with pytest.raises(ValueError, match="rebuild"):
        index.refresh(draining)
    with pytest.raises(ValueError, match="new active worker"):
        index.append(snap)


@pytest.mark.parametrize("seed", range(5))
def test_set_load_matches_a_rebuild(seed: int) -> None:
    # set_load is refresh for a worker whose shape is unchanged: batch, free blocks, adapters only.
    rng = random.Random(seed)
    snaps = [_snap(rng, f"w{i}") for i in range(12)]
    index = PlacementIndex(snaps)
    for _ in range(60):
        for _ in range(3):
            slot = index.best_packing(f"a{rng.randrange(6)}", rng.randint(1, 40))
            if slot is not None:
                index.assign(slot, f"a{rng.randrange(6)}", 8)
        for i in range(len(snaps)):
            old = snaps[i]
            if rng.random() < 0.5:  # a new load on the same shape; sometimes the same adapters
                fresh = _snap(rng, old.worker_id)
                adapters = old.resident_adapters if rng.random() < 0.5 else fresh.resident_adapters
                running = fresh.running[: old.max_batch_size]
                free = rng.randint(0, old.total_kv_blocks)
                snaps[i] = WorkerSnapshot(
                    old.worker_id, old.state, running, old.max_batch_size, free, old.total_kv_blocks,
                    old.block_size, adapters,
                )  # fmt: skip
            s = snaps[i]
            index.set_load(index.by_id[s.worker_id], s.num_running, s.free_kv_blocks, s.resident_adapters)
        assert _state(index) == _state(PlacementIndex(snaps))
