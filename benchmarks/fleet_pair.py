"""bench_fleet.py's kill pair in its own dtype (`--kill-dtype`): the packing policy twice on the plan
of the policy runs, once without and once with the worker kill, both in that dtype (float32: the
greedy tokens of the two must be equal, which bf16's half-ulp argmax flips rule out).

The pair serves both workers from the start (`--workers 2`): the kill needs two active workers,
and waiting for the fleet to grow would cost a whole server start of that dtype inside each run.
Both runs replay the plan's first requests at the same times, their prompts clamped to
`--pair-max-prompt-tokens` (float32 prefill is compute bound: ~67 TFLOPS on an H200 against ~990
in bf16, so prompt length dominates its cost). How many: sized from the speed the reference run's
own warm-up measures (the first GPU attempt sized it from a FLOPs guess, 1/8 of bf16, and its
reference was cut off), so that the reference replays them all and the kill run still fits. The
kill run then replays the prefix the reference completed (fewer if the time left holds fewer).
Pure functions: the sizing. fleet_kill.py runs the two runs (bench_fleet.py's kill step).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet_settings import SHORT_DTYPES

# A run with the kill holds one worker from the kill until a replacement starts (a start of that
# dtype, longer than most pairs' replays): it serves at one worker's rate, the reference at two.
KILL_RUN_WORKERS = 1.0
REFERENCE_WORKERS = 2.0


@dataclass(frozen=True)
class PairPlan:
    requests: int  # both runs replay the plan's first `requests` requests
    reference_s: float  # estimated replay seconds of the run without the kill
    kill_s: float  # and of the run with it
    worker_requests_per_s: float  # one worker of the pair's dtype, as the sizing took it
    # The kill waits for a worker holding this many: a third of the prefix up to a full batch, so
    # that many of the compared requests are resumed ones (the pair's workers fill up at once).
    kill_min_running: int


def pair_names(dtype: str) -> tuple[str, str]:
    """(run without the kill, run with it), e.g. packing-f32 and packing-f32-kill."""
    short = SHORT_DTYPES.get(dtype)
    if short is None:
        raise ValueError(f"no kill pair for dtype {dtype!r}; one of {', '.join(SHORT_DTYPES)}")
    return f"packing-{short}", f"packing-{short}-kill"


def replay_estimate(arrivals: Sequence[float], count: int, per_worker: float, workers: float) -> float:
    """Seconds until the first `count` requests (sent at `arrivals`, sorted) are all done: not before
    the last is sent, nor before `workers` workers of `per_worker` requests/s have served them all,
    plus one request's service time for the last one."""
    if count <= 0:
        return 0.0
    return max(arrivals[count - 1], count / (workers * per_worker)) + 1.0 / per_worker


def size_pair(
    arrivals: Sequence[float],
    burst_start_s: float,
    replay_budget_s: float,
    per_worker: float,
    kill_min_running: int,
    batch_cap: int,
) -> PairPlan:
    """The longest prefix of the plan whose two replays fit `replay_budget_s` seconds together.

    `arrivals`: the plan's send times, sorted. ValueError when even the shortest useful prefix does
    not fit: the kill waits for the burst and for a worker holding `kill_min_running` sequences,
    so the prefix must reach `2 * kill_min_running` requests into the burst. `batch_cap`: the most
    sequences a worker runs at once.
    """
    if not per_worker > 0:
        raise ValueError(f"a worker's requests/s must be > 0, got {per_worker}")
    if any(b < a for a, b in itertools.pairwise(arrivals)):
        raise ValueError("the arrivals must be sorted")
    before = sum(1 for t in arrivals if t < burst_start_s)
    least = shortest_prefix(arrivals, burst_start_s, kill_min_running)

    def cost(n: int) -> tuple[float, float]:
        return (
            replay_estimate(arrivals, n, per_worker, REFERENCE_WORKERS),
            replay_estimate(arrivals, n, per_worker, KILL_RUN_WORKERS),
        )

    best = None
    for n in range(least, len(arrivals) + 1):  # the cost grows with n: the last that fits
        ref, kill = cost(n)
        if ref + kill > replay_budget_s:
            break
        best = PairPlan(n, ref, kill, per_worker, max(kill_min_running, min(batch_cap, n // 3)))
    if best is None or least <= before:
        ref, kill = cost(max(least, 1))
        raise ValueError(
            f"the kill pair needs {ref + kill:.0f} s of replay for its shortest prefix ({least} requests, "
            f"{least - before} into the burst) and {max(replay_budget_s, 0.0):.0f} s are left"
        )
    return best


def shortest_prefix(arrivals: Sequence[float], burst_start_s: float, kill_min_running: int) -> int:
    """The fewest requests a pair can use: the kill waits for the burst and for a worker holding
    `kill_min_running`, so the prefix reaches `2 * kill_min_running` requests into the burst."""
    before = sum(1 for t in arrivals if t < burst_start_s)
    return min(len(arrivals), before + 2 * kill_min_running)


def completed_prefix(requests: Sequence[Mapping[str, Any]]) -> int:
    """How many leading requests of a run record completed ("ok"): the kill run replays those, so
    that every request it sends has a reference (a cut-off reference shrinks the pair)."""
    return next((i for i, r in enumerate(requests) if r["status"] != "ok"), len(requests))


def kill_run_plan(
    arrivals: Sequence[float],
    completed: int,
    replay_budget_s: float,
    per_worker: float,
    least: int,
    kill_min_running: int,
    batch_cap: int,
) -> PairPlan:
    """The kill run's prefix: the longest of the reference's `completed` leading requests whose
    replay on one worker fits `replay_budget_s`, and never fewer than min(completed, least) (what
    the budget then cuts off is counted apart, not compared)."""
    if not per_worker > 0:
        raise ValueError(f"a worker's requests/s must be > 0, got {per_worker}")
    n = min(completed, least)
    for m in range(n + 1, completed + 1):
        if replay_estimate(arrivals, m, per_worker, KILL_RUN_WORKERS) > replay_budget_s:
            break
        n = m
    return PairPlan(
        n,
        replay_estimate(arrivals, n, per_worker, REFERENCE_WORKERS),
        replay_estimate(arrivals, n, per_worker, KILL_RUN_WORKERS),
        per_worker,
        max(kill_min_running, min(batch_cap, n // 3)),
    )


def fixed_seconds(start_s: float, warmup_s: float, tail_s: float, stop_s: float) -> float:
    """One pair run's seconds besides its replay."""
    return start_s + warmup_s + tail_s + stop_s


def estimate_seconds(fixed_s: float, replay_s: float) -> float:
    """The pair's seconds for the budget planner before the phases are known: two runs' fixed
    costs (estimates: the speed is measured in the reference's warm-up) and the replay seconds
    reserved for them."""
    return 2 * fixed_s + replay_s
