"""Simulator workloads: Azure LLM traces, ServeGen tenant folders, generic CSVs, Punica synthetic.

Every loader returns `SimRequest`s sorted by arrival. Trace parsing and Punica popularities are the
load generator's (`lorafleet.bench.workload`); this module adds what only the simulator needs: the generic
CSV, ServeGen tenants, the cosine-rate Poisson process, rate and time scaling, and clamping lengths
to the profile's context limit.

Scaling: `time_scale` multiplies every timestamp (2 = the same requests over twice the time);
`rate_scale` keeps the time span and changes how many requests arrive in it: each request is kept
with probability X (X < 1) or copied floor(X) or ceil(X) times (X > 1), copies spread uniformly over
the gap to the next request, so the rate's shape over time is kept.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafleet.bench.workload import AZURE_COLUMNS, POPULARITIES, adapter_indices, read_azure_trace
from lorafleet.sim.sim_types import SimRequest

GENERIC_COLUMNS = ("timestamp_s", "prompt_tokens", "output_tokens")
SERVEGEN_WINDOW_S = 600.0  # ServeGen m-large rows are 10-minute windows


@dataclass(frozen=True)
class Row:
    at_s: float
    prompt: int
    output: int
    adapter: str | None = None


@dataclass(frozen=True)
class WorkloadInfo:
    source: str
    requests: int
    clamped: int  # requests whose lengths were cut to the profile's context limit
    adapters: int  # distinct adapters


# ---------------------------------------------------------------------- readers


def read_generic_csv(path: Path) -> list[Row]:
    """`timestamp_s,prompt_tokens,output_tokens[,adapter]`; errors name the file, row and column."""
    rows: list[Row] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for col in GENERIC_COLUMNS:
            if col not in header:
                raise ValueError(f"{path}: row 1: missing column {col!r} (header: {','.join(header)})")
        has_adapter = "adapter" in header
        prev = -math.inf
        for line, rec in enumerate(reader, start=2):
            try:
                at = float(rec["timestamp_s"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}: row {line}, column timestamp_s: {rec['timestamp_s']!r} is not a number"
                ) from None
            if not math.isfinite(at) or at < 0:
                raise ValueError(f"{path}: row {line}, column timestamp_s: must be a time >= 0, got {at}")
            if at < prev:
                raise ValueError(
                    f"{path}: row {line}, column timestamp_s: {at} is before the previous row's {prev} "
                    "(timestamps must not decrease)"
                )
            prev = at
            lengths = []
            for col in ("prompt_tokens", "output_tokens"):
                try:
                    value = int(rec[col])
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}: row {line}, column {col}: {rec[col]!r} is not an integer"
                    ) from None
                if value < 0:
                    raise ValueError(f"{path}: row {line}, column {col}: negative length {value}")
                lengths.append(value)
            adapter = (rec.get("adapter") or None) if has_adapter else None
            rows.append(Row(at, lengths[0], lengths[1], adapter))
    if not rows:
        raise ValueError(f"{path}: the trace has no requests")
    return rows


def read_azure(path: Path) -> list[Row]:
    return [Row(r.at_s, r.context_tokens, r.generated_tokens) for r in read_azure_trace(path)]


@dataclass(frozen=True)
class TenantWindow:
    start_s: float
    rate: float
    dist: str
    shape: float


def read_servegen(folder: Path, start_s: float, span_s: float) -> dict[str, list[TenantWindow]]:
    """Each `chunk-<client>-trace.csv` as a tenant: its windows overlapping [start, start + span)."""
    files = sorted(folder.glob("chunk-*-trace.csv"))
    if not files:
        raise ValueError(f"{folder}: no ServeGen chunk-<client>-trace.csv files")
    tenants: dict[str, list[TenantWindow]] = {}
    for file in files:
        client = file.name[len("chunk-") : -len("-trace.csv")]
        windows: list[TenantWindow] = []
        with file.open(newline="") as handle:
            for line, rec in enumerate(csv.reader(handle), start=1):
                if len(rec) != 6:
                    raise ValueError(f"{file}: row {line}: expected 6 columns, got {len(rec)}")
                try:
                    t, rate = float(rec[0]), float(rec[1])
                    shape = float(rec[4]) if rec[3] else 0.0
                except ValueError:
                    raise ValueError(
                        f"{file}: row {line}: window_start_s, rate and p1 must be numbers"
                    ) from None
                if rate < 0 or not math.isfinite(rate):
                    raise ValueError(f"{file}: row {line}, column 2 (rate): must be >= 0, got {rate}")
                if rec[3] not in ("", "Weibull", "Gamma"):
                    raise ValueError(f"{file}: row {line}, column 4: unknown distribution {rec[3]!r}")
                if rate > 0 and start_s - SERVEGEN_WINDOW_S < t < start_s + span_s:
                    windows.append(TenantWindow(t, rate, rec[3] or "Exponential", shape))
        tenants[f"tenant-{client}"] = windows
    return tenants


def servegen_popularity(folder: Path, start_s: float, span_s: float) -> tuple[list[str], list[float]]:
    """Tenants and their request shares over the span (the study's adapter popularity)."""
    tenants = read_servegen(folder, start_s, span_s)
    names = sorted(tenants, key=lambda n: -sum(w.rate for w in tenants[n]))
    weights = [sum(w.rate for w in tenants[n]) for n in names]
    keep = [(n, w) for n, w in zip(names, weights) if w > 0]
    if not keep:
        raise ValueError(f"{folder}: no tenant sends requests between {start_s} s and {start_s + span_s} s")
    return [n for n, _ in keep], [w for _, w in keep]


def _gap(rng: random.Random, window: TenantWindow) -> float:
    # The fitted family's shape with its scale set so the mean gap is 1 / rate: the rate is the
    # file's primary figure, and the shape carries the burstiness (its CV).
    mean = 1.0 / window.rate
    if window.dist == "Weibull" and window.shape > 0:
        k = window.shape
        return rng.weibullvariate(mean / math.gamma(1 + 1 / k), k)
    if window.dist == "Gamma" and window.shape > 0:
        return rng.gammavariate(window.shape, mean / window.shape)
    return rng.expovariate(window.rate)


def servegen_arrivals(
    folder: Path, start_s: float, span_s: float, rng: random.Random
) -> list[tuple[float, str]]:
    """(arrival offset from `start_s`, tenant) for every tenant, merged and sorted."""
    out: list[tuple[float, str]] = []
    for tenant, windows in read_servegen(folder, start_s, span_s).items():
        for w in windows:
            lo, hi = max(w.start_s, start_s), min(w.start_s + SERVEGEN_WINDOW_S, start_s + span_s)
            t = w.start_s + _gap(rng, w)
            while t < hi:
                if t >= lo:
                    out.append((t - start_s, tenant))
                t += _gap(rng, w)
    out.sort()
    return out


def cosine_poisson(
    mean_rate: float, duration_s: float, period_s: float, amplitude: float, rng: random.Random
) -> list[float]:
    """Poisson arrivals whose rate is mean * (1 + amplitude * cos(2 pi t / period)) (Punica, sec. 7)."""
    if not mean_rate > 0 or not duration_s > 0 or not period_s > 0:
        raise ValueError("rate, duration and period must be > 0")
    if not 0 <= amplitude <= 1:
        raise ValueError(f"amplitude must be in [0, 1], got {amplitude}")
    peak = mean_rate * (1 + amplitude)
    out: list[float] = []
    t = rng.expovariate(peak)
    while t < duration_s:  # thinning: keep each candidate with probability rate(t) / peak
        if rng.random() * peak <= mean_rate * (1 + amplitude * math.cos(2 * math.pi * t / period_s)):
            out.append(t)
        t += rng.expovariate(peak)
    return out


# ---------------------------------------------------------------------- assembly


def rescale(rows: Sequence[Row], rate_scale: float, time_scale: float, rng: random.Random) -> list[Row]:
    for name, x in (("rate_scale", rate_scale), ("time_scale", time_scale)):
        if not (x > 0 and math.isfinite(x)):
            raise ValueError(f"{name} must be a number > 0, got {x!r}")
    out: list[Row] = []
    for i, r in enumerate(rows):
        copies = int(rate_scale) + (rng.random() < rate_scale - int(rate_scale))
        gap = (rows[i + 1].at_s - r.at_s) if i + 1 < len(rows) else 0.0
        for c in range(copies):
            at = r.at_s if c == 0 else r.at_s + rng.random() * gap
            out.append(Row(at * time_scale, r.prompt, r.output, r.adapter))
    out.sort(key=lambda r: r.at_s)
    return out


def assign_adapters(
    rows: Sequence[Row],
    popularity: str,
    num_adapters: int | None,
    rng: random.Random,
    tenants: tuple[list[str], list[float]] | None = None,
) -> list[str | None]:
    """Adapters for rows without one: a Punica popularity, or ServeGen tenant shares."""
    if tenants is not None:
        names, weights = tenants
        drawn = rng.choices(names, weights=weights, k=len(rows))
    else:
        if popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {', '.join(POPULARITIES)} or servegen:FOLDER")
        drawn = [f"adapter-{i}" for i in adapter_indices(popularity, len(rows), rng, num_adapters)]
    return [r.adapter if r.adapter is not None else a for r, a in zip(rows, drawn)]


def to_requests(
    rows: Sequence[Row], adapters: Sequence[str | None], max_model_len: int
) -> tuple[list[SimRequest], int]:
    """Lengths cut to the context limit (as the load generator does): output first, then prompt."""
    out: list[SimRequest] = []
    clamped = 0
    for r, a in zip(rows, adapters):
        output = max(1, min(r.output, max_model_len - 1))
        prompt = max(1, min(r.prompt, max_model_len - output))
        clamped += (prompt, output) != (r.prompt, r.output)
        out.append(SimRequest(r.at_s, a, prompt, output))
    return out, clamped


def load_rows(
    trace: str,
    *,
    servegen_start_s: float = 0.0,
    servegen_span_s: float = 3600.0,
    prompt_len: tuple[int, int] = (64, 1024),
    output_len: tuple[int, int] = (16, 512),
    seed: int = 0,
) -> list[Row]:
    """Rows of a trace file or ServeGen folder; ServeGen rows get uniform lengths in the ranges."""
    path = Path(trace)
    if path.is_dir():
        rng = random.Random(seed)
        return [
            Row(t, rng.randint(*prompt_len), rng.randint(*output_len), tenant)
            for t, tenant in servegen_arrivals(path, servegen_start_s, servegen_span_s, rng)
        ]
    if not path.is_file():
        raise ValueError(f"trace {trace!r} is neither a file nor a ServeGen folder")
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    if all(c in header for c in AZURE_COLUMNS):
        return read_azure(path)
    return read_generic_csv(path)


def synthetic_rows(
    *,
    rate: float,
    duration_s: float,
    period_s: float,
    amplitude: float,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int = 0,
) -> list[Row]:
    rng = random.Random(seed)
    return [
        Row(t, rng.randint(*prompt_len), rng.randint(*output_len))
        for t in cosine_poisson(rate, duration_s, period_s, amplitude, rng)
    ]


def build_workload(
    rows: Sequence[Row],
    *,
    source: str,
    popularity: str,
    num_adapters: int | None,
    max_model_len: int,
    rate_scale: float = 1.0,
    time_scale: float = 1.0,
    tenants: tuple[list[str], list[float]] | None = None,
    seed: int = 0,
) -> tuple[list[SimRequest], WorkloadInfo]:
    rng = random.Random(seed)
    scaled = rescale(rows, rate_scale, time_scale, rng)
    if not scaled:
        raise ValueError(f"{source}: no requests left after --rate-scale {rate_scale}")
    start = scaled[0].at_s
    scaled = [Row(r.at_s - start, r.prompt, r.output, r.adapter) for r in scaled]
    adapters = assign_adapters(scaled, popularity, num_adapters, rng, tenants)
    requests, clamped = to_requests(scaled, adapters, max_model_len)
    return requests, WorkloadInfo(source, len(requests), clamped, len({a for a in adapters}))
