"""Validation: one workload through the real Ray fleet (CPU workers, the demo model) and the simulator.

The real side is `lorafleet serve`'s own stack in-process (`start_serving`) driven by `lorafleet
bench`'s open-loop sender (`run_bench`), so TTFT and TPOT are measured by a gRPC client as an
operator would see them. The simulated side replays exactly the requests the bench sent (arrival,
adapter name as registered, prompt and output lengths) with the same fleet settings and a profile
measured on the same machine. Imports Ray and gRPC lazily: only validation runs load them.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any

from lorafleet.sim.profile import LatencyProfile
from lorafleet.sim.report import latencies
from lorafleet.sim.sim_types import SimConfig, SimRequest, SimResult
from lorafleet.sim.simulator import Simulator

# Quantities compared, with the targets (relative error).
TARGETS = {
    "throughput_tok_s": 0.05,
    "ttft_mean_s": 0.10,
    "tpot_mean_s": 0.10,
    "ttft_p90_s": 0.15,
    "tpot_p90_s": 0.15,
}


@dataclass(frozen=True)
class FleetSetup:
    model_dir: str
    adapters_dir: str
    max_workers: int = 3
    min_workers: int = 1
    max_batch_size: int = 4
    consolidation_interval_s: float = 2.0
    idle_release_s: float = 30.0
    policy: str = "packing"
    cpu_cores: float | None = None  # the simulator's contention model (None: none)
    # Real workers' torch threads (EngineConfig.cpu_threads; None: Ray's default, 1). The profile
    # must have been measured with the same value.
    cpu_threads: int | None = None


# Fleet events counted on both sides (FleetCounters on the real fleet, SimResult in the simulator).
EVENTS = (
    "worker_starts",
    "workers_released",
    "migrations",
    "evictions",
    "preemptions",
    "adapter_loads",
    "adapter_disk_loads",
)
# The fleet counter behind each event where the names differ: the simulator's adapter_loads are GPU
# slot fills (the engines' adapter-cache misses), its disk loads the engines' reads from disk.
REAL_COUNTERS = {"adapter_loads": "adapter_cache_misses", "adapter_disk_loads": "adapter_loads"}


@dataclass
class RealRun:
    report: Any  # lorafleet.bench.runner.BenchReport
    records: list[Any]  # lorafleet.bench.runner.RequestRecord, in plan order
    sent: list[SimRequest]  # the same requests, for the simulator
    events: dict[str, int] = field(default_factory=dict)  # EVENTS, from the fleet's counters at the end
    # Seconds each worker started during the run took from asked for to active (the profile's
    # worker_start_s is what the simulator uses), seen by polling the in-process fleet.
    start_s: list[float] = field(default_factory=list)


def real_run(setup: FleetSetup, plan: list[Any], seed: int = 0) -> RealRun:
    """Run `plan` (PlannedRequests) on a real CPU fleet."""
    return asyncio.run(_real_run(setup, plan, seed))


async def _real_run(setup: FleetSetup, plan: list[Any], seed: int) -> RealRun:
    from lorafleet.bench.runner import run_bench
    from lorafleet.client.grpc_client import ApiError, AsyncClient
    from lorafleet.config import ServeConfig
    from lorafleet.serving.serve import shutdown_serving, start_serving

    config = ServeConfig(
        model=setup.model_dir,
        adapters_dir=setup.adapters_dir,
        workers=setup.min_workers,
        max_workers=setup.max_workers,
        port=0,
        metrics_port=None,
        http_port=None,  # gRPC only: no fixed port to collide with other servers
        policy=setup.policy,
        consolidation_interval_s=setup.consolidation_interval_s,
        idle_release_s=setup.idle_release_s,
        engine=_engine_options(setup),
    )
    api = await start_serving(config)
    try:
        async with AsyncClient(api.address) as client:
            await client.wait_ready(60.0)
            records: list[Any] = []
            starts: list[float] = []
            watcher = asyncio.create_task(_watch_starts(api.servicer.fleet, starts))
            try:
                report = await run_bench(
                    client, plan, seed=seed, request_timeout_s=300.0, records_out=records
                )
            finally:
                watcher.cancel()
            events: dict[str, int] = {}
            try:  # a lost status answer costs the event counts, not the run
                counters = (await client.status(timeout=10.0)).counters
                events = {name: int(getattr(counters, REAL_COUNTERS.get(name, name))) for name in EVENTS}
            except ApiError:
                pass
    finally:
        await shutdown_serving(api, drain_timeout_s=30.0)
    sent = [SimRequest(p.at_s, r.adapter, p.prompt_len, p.max_new_tokens) for p, r in zip(plan, records)]
    return RealRun(report, records, sent, events, starts)


async def _watch_starts(fleet: Any, out: list[float], every_s: float = 0.05) -> None:
    """Append each worker's start-up seconds (first seen starting -> first seen active) to ``out``."""
    import time

    asked: dict[str, float] = {}
    while True:
        now = time.monotonic()
        for w in fleet.status().workers:
            if w.state == "starting":
                asked.setdefault(w.worker_id, now)
            elif w.worker_id in asked:
                out.append(now - asked.pop(w.worker_id))
        await asyncio.sleep(every_s)


def _engine_options(setup: FleetSetup) -> dict[str, Any]:
    options: dict[str, Any] = {"max_batch_size": setup.max_batch_size}
    if setup.cpu_threads is not None:
        options["cpu_threads"] = setup.cpu_threads
    return options


def sim_run(setup: FleetSetup, profile: LatencyProfile, requests: list[SimRequest]) -> SimResult:
    config = SimConfig(
        policy=setup.policy,
        max_gpus=setup.max_workers,
        min_gpus=setup.min_workers,
        consolidation_interval_s=setup.consolidation_interval_s,
        idle_release_s=setup.idle_release_s,
        cpu_cores=setup.cpu_cores,
    )
    return Simulator(config, profile, requests).run()


def _q(values: list[float], q: float) -> float:
    from lorafleet.bench.workload import percentile

    out = percentile(values, q)
    return float("nan") if out is None else out


def compare(real_run: RealRun, result: SimResult) -> dict[str, dict[str, float]]:
    """Each compared quantity: real, simulated, relative error (TTFT, TPOT as the bench defines them)."""
    ttft, tpot, _ = latencies(result)
    tokens = sum(r.output_tokens for r in result.records if r.finish is not None)
    # The bench's wall clock runs from the plan's time 0 (not the first arrival) to the last stream's
    # end; the simulator replays the plan on the same clock, so its span starts at 0 too.
    span = result.end_s
    sim = {
        "throughput_tok_s": tokens / span,
        "ttft_mean_s": float(ttft.mean()),
        "tpot_mean_s": float(tpot.mean()),
        "ttft_p90_s": _q(list(ttft), 90),
        "tpot_p90_s": _q(list(tpot), 90),
        "peak_workers": float(result.peak_gpus),
    }
    ok = [r for r in real_run.records if r.status == "ok" and r.first_token_at is not None]
    real_ttft = [r.first_token_at - r.sent_at for r in ok]
    real_tpot = [(r.last_token_at - r.first_token_at) / (r.tokens - 1) for r in ok if r.tokens > 1]
    report = real_run.report
    real = {
        "throughput_tok_s": report.tokens_per_s,
        "ttft_mean_s": statistics.fmean(real_ttft),
        "tpot_mean_s": statistics.fmean(real_tpot),
        "ttft_p90_s": _q(real_ttft, 90),
        "tpot_p90_s": _q(real_tpot, 90),
        "peak_workers": float(max((s.active for s in report.workers_over_time), default=0)),
    }
    return {k: {"real": real[k], "sim": sim[k], "error": (sim[k] - real[k]) / real[k]} for k in sim}


def _time_mean(changes: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Time-weighted mean over [lo, hi) of a step function given as (time, value) changes."""
    total, value, t = 0.0, 0.0, lo
    for when, v in changes:
        if when > lo:
            total += value * (min(when, hi) - t)
            t = min(when, hi)
        if when >= hi:
            break
        value = v
    total += value * (hi - t)
    return total / (hi - lo)


def busy_over_time(real_run: RealRun, result: SimResult, bucket_s: float) -> list[tuple[float, float, float]]:
    """(bucket start, mean busy workers real, simulated) per bucket; the real side is the bench's
    0.1 s samples, the simulated side the exact step function."""
    report = real_run.report
    end = max(result.end_s, max((s.t_s for s in report.workers_over_time), default=0.0))
    sim_changes = [(t, float(b)) for t, _, b in result.busy_over_time]
    out = []
    t = 0.0
    while t < end:
        real = [s.busy for s in report.workers_over_time if t <= s.t_s < t + bucket_s]
        out.append(
            (t, statistics.fmean(real) if real else float("nan"), _time_mean(sim_changes, t, t + bucket_s))
        )
        t += bucket_s
    return out


def format_comparison(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| quantity | real | simulated | error | target |", "|---|---:|---:|---:|---:|"]
    for k, v in rows.items():
        target = f"{TARGETS[k] * 100:.0f}%" if k in TARGETS else "equal"
        lines.append(f"| {k} | {v['real']:.4g} | {v['sim']:.4g} | {v['error'] * 100:+.1f}% | {target} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class PhaseRow:
    """Mean TTFT and TPOT (seconds) of the requests arriving in [start_s, end_s), real and simulated."""

    start_s: float
    end_s: float
    requests: int
    tpot_real: float
    tpot_sim: float
    ttft_real: float
    ttft_sim: float


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def by_phase(real_run: RealRun, result: SimResult, bounds: list[float]) -> list[PhaseRow]:
    """Per phase (arrival time between consecutive ``bounds``): where the two sides part ways.

    Requests are matched by position: the simulator replays ``real_run.sent`` in order, and the
    bench's records are in the same (plan) order."""
    if len(result.records) != len(real_run.records):
        raise ValueError(f"{len(result.records)} simulated requests against {len(real_run.records)} real")
    rows = []
    for lo, hi in itertools.pairwise(bounds):
        ttft_r, tpot_r, ttft_s, tpot_s, count = [], [], [], [], 0
        for sent, real, sim in zip(real_run.sent, real_run.records, result.records):
            if not lo <= sent.at_s < hi:
                continue
            count += 1
            if real.status == "ok" and real.first_token_at is not None:
                ttft_r.append(real.first_token_at - real.sent_at)
                if real.tokens > 1:
                    tpot_r.append((real.last_token_at - real.first_token_at) / (real.tokens - 1))
            if sim.finish is not None and sim.first_token is not None:
                ttft_s.append(sim.first_token - sim.arrival)
                if sim.output_tokens > 1:
                    tpot_s.append((sim.finish - sim.first_token) / (sim.output_tokens - 1))
        rows.append(PhaseRow(lo, hi, count, _mean(tpot_r), _mean(tpot_s), _mean(ttft_r), _mean(ttft_s)))
    return rows


def format_phases(rows: list[PhaseRow]) -> str:
    lines = [
        "| phase (s) | requests | TPOT real ms | TPOT sim ms | error | TTFT real ms | TTFT sim ms | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r.start_s:.0f}-{r.end_s:.0f}", str(r.requests)]
        for real, sim in ((r.tpot_real, r.tpot_sim), (r.ttft_real, r.ttft_sim)):
            cells += [f"{real * 1e3:.2f}", f"{sim * 1e3:.2f}", f"{(sim / real - 1) * 100:+.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_events(real_run: RealRun, result: SimResult) -> str:
    """Fleet events, real against simulated: how often the fleet grew, shrank and moved work."""
    if not real_run.events:
        return "(fleet events: not recorded in this real run)"
    lines = ["| event | real | simulated |", "|---|---:|---:|"]
    for name in EVENTS:
        lines.append(f"| {name} | {real_run.events.get(name, '-')} | {getattr(result, name)} |")
    return "\n".join(lines)
