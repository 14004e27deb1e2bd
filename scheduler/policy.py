"""Placement policies: Punica's packing rule and the baselines it is compared against.

Pure Python over plain dataclasses (no torch, no Ray): the runtime and the simulator share it. A
policy is deterministic for a given input: the workers are considered in the order given, ties are
broken by that order, and the random baseline draws from its own seeded generator. Placement needs
no clock; the time-driven part (idle release) lives in `consolidation.ConsolidationPolicy`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lorafleet.scheduler.placement_index import PlacementIndex, WorkerSlot
from lorafleet.scheduler.policy_types import (
    Decision,
    PendingRequest,
    Place,
    Queue,
    Reject,
    StartWorker,
    WorkerSnapshot,
    WorkerState,
    blocks_for,
)
from lorafleet.scheduler.request_queue import RequestQueue


class PlacementPolicy:
    """Punica's rule: the feasible worker with the largest current batch.

    Feasible: batch below its maximum and free KV blocks for the prompt plus one spare block per
    running sequence. Ties: the adapter is already resident there, then fewer free blocks, then the
    worker's position in the input. Requests leave the queue strictly in FCFS order: when the head
    fits nowhere, everything behind it waits too, so a large request cannot be starved by a stream
    of small ones; the fleet then asks for another worker if it may grow.

    `batch_target` (every policy; None = the engine's limit): a worker counts as having room for
    placement only while its batch is below it. When no worker below the target can take the head,
    the fleet asks for another worker (if it may grow) and, rather than queue the request behind a
    start-up of tens of seconds, gives it to the feasible worker with the smallest batch up to the
    engine's limit: the headroom above the target absorbs a surge while the fleet grows, and the
    target, not the engine's limit, sets how full the fleet runs (fewer GPUs against shorter
    batches). The overflow goes to the emptiest worker, not the fullest, so no worker's batch (and
    step time) runs ahead of the others'.
    """

    name = "packing"

    def __init__(self, *, max_workers: int | None = None, batch_target: int | None = None) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1 or None, got {max_workers}")
        if batch_target is not None and (
            isinstance(batch_target, bool) or not isinstance(batch_target, int) or batch_target < 1
        ):
            raise ValueError(f"batch_target must be an integer >= 1 or None, got {batch_target!r}")
        self.max_workers = max_workers
        self.batch_target = batch_target

    def choose(self, index: PlacementIndex, request: PendingRequest, below: int | None) -> WorkerSlot | None:
        """The worker this policy picks among those with room (batch below `below`, if given)."""
        return index.best_packing(request.adapter, request.prompt_len, below=below)

    def schedule(
        self,
        queue: RequestQueue,
        workers: Sequence[WorkerSnapshot],
        *,
        limit: int | None = None,
        index: PlacementIndex | None = None,
    ) -> list[Decision]:
        """Place queued requests from the head; pops what it places or rejects.

        Returns Place/Reject decisions in order, then, if the head stays blocked, one Queue decision
        for it and possibly a StartWorker. `limit` caps the Place decisions of this pass. `index`, if
        given, must equal `PlacementIndex(workers)` (a caller keeping one across passes, like the
        simulator, refreshes the workers that changed); the pass updates it with its placements.
        """
        if index is None:
            index = PlacementIndex(workers)
        decisions: list[Decision] = []
        placed = 0
        target = self.batch_target
        asked_to_grow = False
        while len(queue) and (limit is None or placed < limit):
            request = queue.peek()
            assert request is not None
            slot = self.choose(index, request, target) if index.slots else None
            if slot is None and target is not None and index.slots:
                slot = index.least_loaded(request.prompt_len)  # the headroom above the target
                if slot is not None and not asked_to_grow:
                    asked_to_grow = True
                    if self.may_grow(workers):
                        decisions.append(
                            StartWorker(
                                f"request {request.request_id} finds every worker at its batch target "
                                f"of {target}"
                            )
                        )
            if slot is not None:
                queue.pop()
                index.assign(slot, request.adapter, request.prompt_len)
                decisions.append(Place(request.request_id, slot.worker_id))
                placed += 1
                continue
            reason = self._never_fits(index, request)
            if reason is not None:
                queue.pop()
                decisions.append(Reject(request.request_id, reason))
                continue
            decisions.append(Queue(request.request_id, "no worker can take it now"))
            if not asked_to_grow and self.may_grow(workers):
                decisions.append(StartWorker(f"request {request.request_id} fits on no running worker"))
            break
        return decisions

    def may_grow(self, workers: Sequence[WorkerSnapshot]) -> bool:
        """Ask for one worker at a time: none while another is still starting."""
        live = [w for w in workers if w.state is not WorkerState.STOPPED]
        if any(w.state is WorkerState.STARTING for w in live):
            return False
        return self.max_workers is None or len(live) < self.max_workers

    @staticmethod
    def _never_fits(index: PlacementIndex, request: PendingRequest) -> str | None:
        # Judged against the largest active worker: a new one would be built the same way.
        if not index.slots:
            return None
        if all(blocks_for(request.prompt_len + 1, s.block_size) > s.total for s in index.slots):
            return (
                f"its {request.prompt_len}-token context needs more KV blocks than any worker has "
                f"(largest: {index.max_total_blocks} blocks)"
            )
        return None


class LeastLoadedPolicy(PlacementPolicy):
    """Baseline: the feasible worker with the smallest batch (spreads load; ties: most free blocks)."""

    name = "least_loaded"

    def choose(self, index: PlacementIndex, request: PendingRequest, below: int | None) -> WorkerSlot | None:
        return index.least_loaded(request.prompt_len, below=below)


class RoundRobinPolicy(PlacementPolicy):
    """Baseline: the next feasible worker after the one chosen last, in input order."""

    name = "round_robin"

    def __init__(self, *, max_workers: int | None = None, batch_target: int | None = None) -> None:
        super().__init__(max_workers=max_workers, batch_target=batch_target)
        self._last: str | None = None

    def choose(self, index: PlacementIndex, request: PendingRequest, below: int | None) -> WorkerSlot | None:
        slots = index.slots
        last = index.by_id.get(self._last) if self._last is not None else None
        start = last.order + 1 if last is not None else 0
        for k in range(len(slots)):
            slot = slots[(start + k) % len(slots)]
            if slot.feasible(request.prompt_len, below):
                self._last = slot.worker_id
                return slot
        return None


class RandomPolicy(PlacementPolicy):
    """Baseline: a uniformly random feasible worker from a seeded generator."""

    name = "random"

    def __init__(
        self, *, max_workers: int | None = None, batch_target: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(max_workers=max_workers, batch_target=batch_target)
        self._rng = random.Random(seed)

    def choose(self, index: PlacementIndex, request: PendingRequest, below: int | None) -> WorkerSlot | None:
        # Rejection sampling first: a uniform draw over all workers, kept if feasible, is a uniform
        # draw over the feasible ones, without scanning the fleet for each decision.
        slots = index.slots
        for _ in range(16):
            slot = slots[self._rng.randrange(len(slots))]
            if slot.feasible(request.prompt_len, below):
                return slot
        feasible = index.feasible_slots(request.prompt_len, below=below)
        return self._rng.choice(feasible) if feasible else None


PLACEMENT_POLICIES: dict[str, type[PlacementPolicy]] = {
    cls.name: cls for cls in (PlacementPolicy, RoundRobinPolicy, LeastLoadedPolicy, RandomPolicy)
}


def make_placement_policy(
    name: str, *, max_workers: int | None = None, batch_target: int | None = None, seed: int = 0
) -> PlacementPolicy:
    """The placement policy a config names: packing, round_robin, least_loaded or random."""
    cls = PLACEMENT_POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {sorted(PLACEMENT_POLICIES)}")
    if cls is RandomPolicy:
        return RandomPolicy(max_workers=max_workers, batch_target=batch_target, seed=seed)
    return cls(max_workers=max_workers, batch_target=batch_target)
