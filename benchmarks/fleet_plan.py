"""Sizing bench_fleet.py's workload: the quiet / burst / quiet rates from one worker's measured
capacity, and the phase lengths from what is left of the time budget. Pure functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorafleet.bench.trace_phases import Phase, format_phases, parse_phases


@dataclass(frozen=True)
class RunCosts:
    """Seconds a run costs besides its replay, as measured on the first run (or estimated)."""

    serve_start_s: float  # spawn to ready of a later run: Ray, the worker's load and graph capture
    warmup_s: float  # the warm-up closed loop of later runs, plus waiting for the fleet to idle
    tail_s: float  # sampling after the plan's last arrival
    stop_s: float  # drain and stop of the server


def replay_seconds(
    left_s: float, runs_after: float, costs: RunCosts, extra_s: float, reserve_s: float
) -> float:
    """Plan seconds per run such that the current run (its server is up and warm) and `runs_after`
    more runs, the measurements after them (`extra_s`) and a reserve fit in `left_s` seconds.
    `runs_after` may be fractional: a run that replays only part of the plan counts its part of
    the replay (its start, warm-up, tail and stop in full)."""
    whole = math.ceil(runs_after)
    fixed = costs.tail_s + costs.stop_s
    fixed += whole * (costs.serve_start_s + costs.warmup_s + costs.tail_s + costs.stop_s)
    return (left_s - extra_s - reserve_s - fixed) / (1 + runs_after)


def scale_phases(
    seconds: tuple[float, float, float], plan_s: float, quiet_floors: tuple[float, float]
) -> tuple[float, float, float]:
    """Quiet / burst / quiet lengths that fit `plan_s` (never stretched). The burst is what the
    benchmark is about, so the quiet phases shrink first, down to `quiet_floors` (the second one
    must still show the release of the second GPU); then the burst; then all in proportion."""
    if len(seconds) != 3 or any(s <= 0 for s in seconds):
        raise ValueError(f"expected three phase lengths > 0, got {seconds}")
    q1, burst, q2 = seconds
    f1, f2 = min(quiet_floors[0], q1), min(quiet_floors[1], q2)
    excess = sum(seconds) - max(plan_s, 0.0)
    if excess <= 0:
        return seconds
    room = (q1 - f1) + (q2 - f2)
    if excess <= room:
        cut = excess / room  # the same share of each quiet phase's room
        return (q1 - cut * (q1 - f1), burst, q2 - cut * (q2 - f2))
    excess -= room
    if excess < burst * 0.5:
        return (f1, burst - excess, f2)
    factor = max(plan_s, 0.0) / (f1 + burst * 0.5 + f2)
    return (f1 * factor, burst * 0.5 * factor, f2 * factor)


def shaped_phases(quiet_rate: float, burst_rate: float, seconds: tuple[float, float, float]) -> str:
    """The `--phases` text of quiet / burst / quiet."""
    if not 0 <= quiet_rate < burst_rate:
        raise ValueError(f"need 0 <= quiet rate ({quiet_rate:g}) < burst rate ({burst_rate:g})")
    rates = (quiet_rate, burst_rate, quiet_rate)
    return format_phases([Phase(r, s) for r, s in zip(rates, seconds)])


def burst_window(phases: str) -> tuple[float, float, float]:
    """(burst start, burst end, plan seconds) of a quiet / burst / quiet `--phases` text."""
    parsed = parse_phases(phases)
    if len(parsed) != 3:
        raise ValueError(f"expected three phases (quiet, burst, quiet), got {len(parsed)}")
    start = parsed[0].seconds
    return start, start + parsed[1].seconds, sum(p.seconds for p in parsed)


def capacity_rates(
    tokens_per_s: float, mean_output_tokens: float, quiet_factor: float, burst_factor: float
) -> tuple[float, float, float]:
    """(one worker's requests/s, quiet rate, burst rate) from its measured token rate."""
    if not tokens_per_s > 0 or not mean_output_tokens > 0:
        raise ValueError("the measured token rate and the mean output length must be > 0")
    capacity = tokens_per_s / mean_output_tokens
    return capacity, quiet_factor * capacity, burst_factor * capacity
