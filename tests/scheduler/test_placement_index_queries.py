"""PlacementIndex queries against the rule written as a scan over every worker, on random fleets large
enough that an adapter's holders outnumber what `_first_resident` walks before scanning them."""

from __future__ import annotations

import random

import pytest

from lorafleet.scheduler.placement_index import _WALK_FIRST, PlacementIndex
from lorafleet.scheduler.policy_types import RunningSeq, WorkerSnapshot, WorkerState, blocks_for


def _fleet(rng: random.Random, n: int, adapters: int) -> list[WorkerSnapshot]:
    # Like a packed fleet: most workers idle (one large bucket) or full; adapter a0 is popular, held
    # by about a fifth of the workers, so its holders outnumber what `_first_resident` walks first.
    out = []
    partly = rng.choice((0.0, 0.05))  # without partly full workers, queries reach the idle bucket
    for w in range(n):
        max_batch = rng.choice((4, 4, 8))
        block = rng.choice((16, 16, 16, 8))
        total = rng.choice((64, 128))
        r = rng.random()
        count = 0 if r < 0.7 else rng.randint(0, max_batch) if r < 0.7 + partly else max_batch
        running = tuple(RunningSeq(f"w{w}-{k}", None, 10, 0.0) for k in range(count))
        # Few distinct free counts, so that many workers tie and the order breaks the tie.
        free = rng.choice((0, 8, total // 2, total, total))
        resident = {f"a{i}" for i in rng.sample(range(adapters), rng.randint(0, min(4, adapters)))}
        if rng.random() < 0.2:
            resident.add("a0")
        out.append(
            WorkerSnapshot(
                f"w{w}", WorkerState.ACTIVE, running, max_batch, free, total, block, frozenset(resident)
            )
        )
    return out


def _scan_best(snaps: list[WorkerSnapshot], adapter: str | None, prompt: int, min_batch: int) -> str | None:
    best = None
    for i, s in enumerate(snaps):
        b = s.num_running
        if b < min_batch or b >= s.max_batch_size or s.free_kv_blocks < blocks_for(prompt, s.block_size) + b:
            continue
        key = (-b, adapter is None or adapter not in s.resident_adapters, s.free_kv_blocks, i)
        if best is None or key < best[0]:
            best = (key, s.worker_id)
    return best and best[1]


@pytest.mark.parametrize("seed", range(8))
def test_best_packing_matches_the_scan(seed: int) -> None:
    rng = random.Random(seed)
    snaps = _fleet(rng, 600, adapters=rng.choice((3, 12, 200)))
    index = PlacementIndex(snaps)
    for _ in range(300):
        adapter = rng.choice((None, "a0", "a0", *(f"a{i}" for i in range(12))))
        prompt, min_batch = rng.choice((rng.randint(1, 64), rng.randint(1, 600))), rng.choice((0, 0, 1, 3))
        got = index.best_packing(adapter, prompt, min_batch=min_batch)
        assert (got and got.worker_id) == _scan_best(snaps, adapter, prompt, min_batch)


def test_the_fleets_have_holders_beyond_the_walk() -> None:
    index = PlacementIndex(_fleet(random.Random(0), 600, adapters=200))
    assert len(index._resident["a0"]) > 2 * _WALK_FIRST
    assert max(len(e) for g in index._levels.values() for e in g.values()) > len(index._resident["a0"])
