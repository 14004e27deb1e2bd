"""Shaping a trace replay for `lorafleet bench`: rate phases over a trace slice, ServeGen tenants.

Phases (`--phases RATE:SECONDS,...`): consecutive rows of the trace from `--trace-start-s` on are
replayed phase after phase. Phase i takes the next round(rate * seconds) rows and stretches or
compresses their native timestamps by one factor so that they fill its seconds; so each phase has its
own mean rate (a quiet phase, a burst, a quiet phase again) while the gaps inside it keep the trace's
burstiness, and every request keeps its trace lengths.

Tenants (`--servegen DIR`): the Azure traces carry no adapter id. ServeGen's per-client request
rates give a realistic skewed popularity (the simulator's `--popularity servegen:DIR`): tenant k by
share becomes logical adapter k, drawn with the tenant's share of requests over a window.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafleet.bench.workload import PlannedRequest, TraceRow


@dataclass(frozen=True)
class Phase:
    rate: float  # requests per second
    seconds: float

    @property
    def requests(self) -> int:
        return round(self.rate * self.seconds)


def parse_phases(text: str) -> list[Phase]:
    """'0.5:10,4:30,0.5:20' -> phases; ValueError naming the bad part."""
    phases: list[Phase] = []
    for part in text.split(","):
        rate_text, sep, seconds_text = part.strip().partition(":")
        try:
            rate, seconds = float(rate_text), float(seconds_text)
        except ValueError:
            rate = seconds = math.nan
        if not sep or not math.isfinite(rate) or not math.isfinite(seconds):
            raise ValueError(f"phase {part.strip()!r} must look like RATE:SECONDS, e.g. 0.5:10")
        if rate < 0 or seconds <= 0:
            raise ValueError(f"phase {part.strip()!r}: the rate must be >= 0 and the seconds > 0")
        phases.append(Phase(rate, seconds))
    if not any(p.requests for p in phases):
        raise ValueError(f"phases {text!r} send no request (rate x seconds rounds to 0 in every phase)")
    return phases


def format_phases(phases: Sequence[Phase]) -> str:
    """The `--phases` text of `phases` (parse_phases' inverse)."""
    return ",".join(f"{p.rate:.6g}:{p.seconds:.6g}" for p in phases)


def slice_rows(rows: Sequence[TraceRow], start_s: float) -> list[TraceRow]:
    """The rows from `start_s` seconds into the trace on, their times shifted to start at 0."""
    if not start_s >= 0:
        raise ValueError(f"the trace start must be >= 0 seconds, got {start_s!r}")
    kept = [r for r in rows if r.at_s >= start_s]
    if not kept:
        span = rows[-1].at_s if rows else 0.0
        raise ValueError(f"the trace has no request after {start_s:g} s (it spans {span:.0f} s)")
    first = kept[0].at_s
    return [dataclasses.replace(r, at_s=r.at_s - first) for r in kept]


def phased_rows(rows: Sequence[TraceRow], phases: Sequence[Phase]) -> list[TraceRow]:
    """`rows` re-timed phase by phase (see the module doc); ValueError when the slice is too short."""
    need = sum(p.requests for p in phases)
    # One row beyond the last phase's requests closes its span (its gap counts, the row is not sent).
    if len(rows) < need + 1:
        raise ValueError(
            f"the phases need {need} consecutive trace requests and the slice has {len(rows) - 1}: "
            "lower the rates or the seconds, or start earlier in the trace"
        )
    out: list[TraceRow] = []
    offset = 0.0
    taken = 0
    for phase in phases:
        n = phase.requests
        chunk = rows[taken : taken + n + 1]
        span = chunk[-1].at_s - chunk[0].at_s
        for k, row in enumerate(chunk[:-1]):
            # Rows sharing one timestamp (span 0) are spread evenly instead of all at once.
            at = (row.at_s - chunk[0].at_s) / span if span > 0 else k / n
            out.append(dataclasses.replace(row, at_s=offset + at * phase.seconds))
        offset += phase.seconds
        taken += n
    return out


def tenant_weights(folder: str | Path, start_s: float, span_s: float) -> tuple[list[str], list[float]]:
    """ServeGen tenants active in the window, most requests first, and their request shares."""
    from lorafleet.sim.workloads import servegen_popularity

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"ServeGen folder {str(folder)!r} does not exist")
    if not span_s > 0:
        raise ValueError(f"the ServeGen window must be > 0 seconds, got {span_s!r}")
    return servegen_popularity(path, start_s, span_s)


def assign_tenants(
    plan: Sequence[PlannedRequest], weights: Sequence[float], seed: int
) -> list[PlannedRequest]:
    """Each request's logical adapter drawn by tenant share (index k = the k-th tenant by share)."""
    if not weights or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError("tenant weights must be >= 0 and not all 0")
    # Its own generator: the draw does not depend on what else used the plan's seed.
    rng = random.Random(f"tenants-{seed}")
    drawn = rng.choices(range(len(weights)), weights=weights, k=len(plan))
    return [dataclasses.replace(p, adapter_index=k) for p, k in zip(plan, drawn)]
