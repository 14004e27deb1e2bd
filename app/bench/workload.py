"""Load-generator workloads: Azure LLM trace replay and Punica's synthetic popularity mixes.

A workload is a list of `PlannedRequest`s (arrival offset, logical adapter, prompt and output
lengths), built without a server, so it is unit-testable and reproducible from its seed.

Punica's adapter popularities over n requests (Chen et al., 2023, section 7):
- distinct: every request its own adapter (n adapters);
- uniform: ceil(sqrt(n)) adapters, equally likely;
- skewed: Zipf with alpha 1.5 over n adapters (P(adapter k) proportional to k^-1.5);
- identical: one adapter for all.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

POPULARITIES = ("distinct", "uniform", "skewed", "identical")
ZIPF_ALPHA = 1.5
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # when to send it, seconds after the run starts
    adapter_index: int  # logical adapter (0 = the most popular); mapped to a name at run time
    prompt_len: int
    max_new_tokens: int


@dataclass(frozen=True)
class TraceRow:
    at_s: float  # seconds after the trace's first request
    context_tokens: int
    generated_tokens: int


def adapter_indices(
    popularity: str, n: int, rng: random.Random, num_adapters: int | None = None
) -> list[int]:
    """One logical adapter index per request under a Punica popularity.

    `num_adapters` fixes the adapter count instead of deriving it from n (the simulator's
    `--adapters N`): uniform and skewed draw over N adapters, distinct cycles through them.
    """
    if popularity not in POPULARITIES:
        raise ValueError(f"popularity must be one of {', '.join(POPULARITIES)}, got {popularity!r}")
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")
    if num_adapters is not None and num_adapters < 1:
        raise ValueError(f"the number of adapters must be >= 1, got {num_adapters}")
    if popularity == "distinct":
        return list(range(n)) if num_adapters is None else [i % num_adapters for i in range(n)]
    if popularity == "identical":
        return [0] * n
    if popularity == "uniform":
        k = num_adapters or max(1, math.ceil(math.sqrt(n)))
        return [rng.randrange(k) for _ in range(n)]
    weights = [(k + 1) ** -ZIPF_ALPHA for k in range(num_adapters or max(n, 1))]
    return rng.choices(range(len(weights)), weights=weights, k=n)


def poisson_arrivals(
    rate: float, duration_s: float, rng: random.Random, limit: int | None = None
) -> list[float]:
    """Arrival offsets of a Poisson process of `rate` per second within [0, duration_s)."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")
    if not duration_s > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration_s!r}")
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s and (limit is None or len(out) < limit):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def synthetic_workload(
    *,
    popularity: str,
    rate: float,
    duration_s: float,
    prompt_len: tuple[int, int] = (8, 64),
    output_len: tuple[int, int] = (8, 32),
    max_requests: int | None = None,
    seed: int = 0,
) -> list[PlannedRequest]:
    """Poisson arrivals; prompt and output lengths uniform in the given inclusive ranges."""
    for name, (lo, hi) in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} range must satisfy 1 <= low <= high, got {lo}..{hi}")
    rng = random.Random(seed)
    arrivals = poisson_arrivals(rate, duration_s, rng, max_requests)
    adapters = adapter_indices(popularity, len(arrivals), rng)
    return [
        PlannedRequest(t, a, rng.randint(*prompt_len), rng.randint(*output_len))
        for t, a in zip(arrivals, adapters)
    ]


def phased_workload(
    phases: Sequence[tuple[float, float]],
    *,
    popularity: str,
    prompt_len: tuple[int, int] = (8, 64),
    output_len: tuple[int, int] = (8, 32),
    seed: int = 0,
) -> list[PlannedRequest]:
    """Poisson arrivals whose rate changes by phase: [(rate, duration_s), ...] back to back.

    Adapters are drawn over the whole run, so a popular adapter stays popular across phases.
    """
    if not phases:
        raise ValueError("phases must list at least one (rate, duration_s)")
    rng = random.Random(seed)
    arrivals: list[float] = []
    offset = 0.0
    for rate, duration_s in phases:
        arrivals.extend(offset + t for t in poisson_arrivals(rate, duration_s, rng))
        offset += duration_s
    adapters = adapter_indices(popularity, len(arrivals), rng)
    return [
        PlannedRequest(t, a, rng.randint(*prompt_len), rng.randint(*output_len))
        for t, a in zip(arrivals, adapters)
    ]


def _parse_timestamp(text: str, where: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> POSIX seconds (7 fractional digits kept, unlike fromisoformat)."""
    try:
        date_part, time_part = text.strip().split(" ")
        hours, minutes, seconds = time_part.split(":")
        day = dt.datetime.fromisoformat(date_part).replace(tzinfo=dt.timezone.utc)
        return day.timestamp() + int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        raise ValueError(f"{where}: TIMESTAMP {text!r} is not like 2023-11-16 18:17:03.97996") from None


def read_azure_trace(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """Rows of an Azure LLM inference trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens), sorted."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"trace file {str(path)!r} does not exist")
    rows: list[tuple[float, int, int]] = []
    with file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{file}: not an Azure LLM trace; missing column(s) {', '.join(missing)}")
        for line, record in enumerate(reader, start=2):
            where = f"{file}:{line}"
            counts = []
            for column in ("ContextTokens", "GeneratedTokens"):
                try:
                    value = int(record[column])
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{where}: column {column}: token counts must be integers, got {record[column]!r}"
                    ) from None
                if value < 0:
                    raise ValueError(f"{where}: column {column}: token counts must be >= 0, got {value}")
                counts.append(value)
            context, generated = counts
            rows.append(
                (_parse_timestamp(record["TIMESTAMP"], where + ": column TIMESTAMP"), context, generated)
            )
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{file}: the trace has no requests")
    rows.sort()
    start = rows[0][0]
    return [TraceRow(t - start, c, g) for t, c, g in rows]


def trace_workload(
    rows: Sequence[TraceRow],
    *,
    popularity: str,
    rate: float | None = None,
    duration_s: float | None = None,
    max_context_tokens: int,
    max_new_tokens_cap: int = 64,
    max_prompt_cap: int | None = None,
    seed: int = 0,
) -> tuple[list[PlannedRequest], int]:
    """Replay a trace: its arrival times (rescaled to `rate` if given), lengths clamped to the model.

    Returns the plan and how many requests had their lengths clamped. The trace has no adapter ids,
    so adapters are drawn from `popularity`.
    """
    if not rows:
        raise ValueError("the trace has no requests")
    if max_context_tokens < 2:
        raise ValueError(f"max_context_tokens must be >= 2, got {max_context_tokens}")
    span = rows[-1].at_s
    scale = 1.0
    if rate is not None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        native = (len(rows) - 1) / span if span > 0 else rate
        scale = native / rate
    kept = [r for r in rows if duration_s is None or r.at_s * scale < duration_s]
    rng = random.Random(seed)
    adapters = adapter_indices(popularity, len(kept), rng)
    plan: list[PlannedRequest] = []
    clamped = 0
    for row, adapter in zip(kept, adapters):
        new_tokens = max(1, min(row.generated_tokens, max_new_tokens_cap, max_context_tokens - 2))
        prompt_room = max_context_tokens - 1 - new_tokens
        if max_prompt_cap is not None:
            prompt_room = min(prompt_room, max_prompt_cap)
        prompt = max(1, min(row.context_tokens, prompt_room))
        if (prompt, new_tokens) != (row.context_tokens, row.generated_tokens):
            clamped += 1
        plan.append(PlannedRequest(row.at_s * scale, adapter, prompt, new_tokens))
    return plan, clamped


def prompt_token_ids(length: int, vocab_size: int, rng: random.Random) -> list[int]:
    """A random prompt; ids from 3 up, past the usual special tokens (bos, eos, pad)."""
    low = 3 if vocab_size > 3 else 0
    return [rng.randrange(low, vocab_size) for _ in range(length)]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
