"""Validation: one workload through the real Ray fleet (CPU workers, the demo model) and the simulator.

The real side is `lorafleet serve`'s own stack in-process (`start_serving`) driven by `lorafleet
bench`'s open-loop sender (`run_bench`), so TTFT and TPOT are measured by a gRPC client as an
operator would see them. The simulated side replays exactly the requests the bench sent (arrival,
adapter name as registered, prompt and output lengths) with the same fleet settings and a profile
measured on the same machine. Imports Ray and gRPC lazily: only validation runs load them.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass
from typing import Any

from lorafleet.sim.profile import LatencyProfile
from lorafleet.sim.report import latencies
from lorafleet.sim.simulator import SimConfig, SimRequest, SimResult, Simulator

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


@dataclass
class RealRun:
    report: Any  # lorafleet.bench.runner.BenchReport
    records: list[Any]  # lorafleet.bench.runner.RequestRecord, in plan order
    sent: list[SimRequest]  # the same requests, for the simulator


def real_run(setup: FleetSetup, plan: list[Any], seed: int = 0) -> RealRun:
    """Run `plan` (PlannedRequests) on a real CPU fleet."""
    return asyncio.run(_real_run(setup, plan, seed))


async def _real_run(setup: FleetSetup, plan: list[Any], seed: int) -> RealRun:
    from lorafleet.bench.runner import run_bench
    from lorafleet.client.grpc_client import AsyncClient
    from lorafleet.config import ServeConfig
    from lorafleet.serving.serve import shutdown_serving, start_serving

    config = ServeConfig(
        model=setup.model_dir,
        adapters_dir=setup.adapters_dir,
        workers=setup.min_workers,
        max_workers=setup.max_workers,
        port=0,
        metrics_port=None,
        policy=setup.policy,
        consolidation_interval_s=setup.consolidation_interval_s,
        idle_release_s=setup.idle_release_s,
        engine={"max_batch_size": setup.max_batch_size},
    )
    api = await start_serving(config)
    try:
        async with AsyncClient(api.address) as client:
            await client.wait_ready(60.0)
            records: list[Any] = []
            report = await run_bench(client, plan, seed=seed, request_timeout_s=300.0, records_out=records)
    finally:
        await shutdown_serving(api, drain_timeout_s=30.0)
    sent = [SimRequest(p.at_s, r.adapter, p.prompt_len, p.max_new_tokens) for p, r in zip(plan, records)]
    return RealRun(report, records, sent)


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
    span = result.end_s - min(r.arrival for r in result.records)
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
