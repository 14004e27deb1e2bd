"""What a simulation run reports: the per-request CSV, the summary, and the comparison table."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorafleet.sim.sim_types import SimResult

REQUEST_COLUMNS = (
    "request_id",
    "arrival_s",
    "adapter",
    "prompt_tokens",
    "output_tokens",
    "first_token_s",
    "finish_s",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "worker",
    "migrations",
    "evictions",
    "preemptions",
    "status",
)


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO limits must be > 0 seconds, got TTFT {self.ttft_s}, TPOT {self.tpot_s}")


def latencies(result: SimResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TTFT, TPOT and end-to-end seconds of the completed requests (TPOT only with > 1 token)."""
    done = [r for r in result.records if r.finish is not None]
    ttft = np.fromiter((r.first_token - r.arrival for r in done), float, len(done))
    e2e = np.fromiter((r.finish - r.arrival for r in done), float, len(done))
    multi = [r for r in done if r.output_tokens > 1]
    tpot = np.fromiter(((r.finish - r.first_token) / (r.output_tokens - 1) for r in multi), float, len(multi))
    return ttft, tpot, e2e


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(result: SimResult, slo: Slo) -> dict[str, Any]:
    done = [r for r in result.records if r.finish is not None]
    ttft, tpot, e2e = latencies(result)
    start = min((r.arrival for r in result.records), default=0.0)
    span = max(result.end_s - start, 1e-9)
    tokens = sum(r.output_tokens for r in done)
    met = sum(
        1
        for r in done
        if r.first_token - r.arrival <= slo.ttft_s
        and (r.output_tokens <= 1 or (r.finish - r.first_token) / (r.output_tokens - 1) <= slo.tpot_s)
    )
    out: dict[str, Any] = {
        "policy": result.config.label,
        "pack_batch_target": result.config.pack_batch_target,
        "profile": result.profile,
        "requests": len(result.records),
        "completed": len(done),
        "rejected": sum(1 for r in result.records if r.rejected),
        "duration_s": span,
        "throughput_tok_s": tokens / span,
        "throughput_req_s": len(done) / span,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        out[f"{name}_mean_s"] = float(values.mean()) if len(values) else None
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = _pct(values, q)
    out.update(
        {
            "slo_ttft_s": slo.ttft_s,
            "slo_tpot_s": slo.tpot_s,
            "slo_attainment": met / len(result.records) if result.records else None,
            "gpu_seconds": result.gpu_seconds,
            "peak_gpus": result.peak_gpus,
            "migrations": result.migrations,
            "evictions": result.evictions,
            "requeued_migrations": result.requeued_migrations,
            "preemptions": result.preemptions,
            "adapter_loads": result.adapter_loads,
            "adapter_disk_loads": result.adapter_disk_loads,
            "worker_starts": result.worker_starts,
            "workers_released": result.workers_released,
            "sim_wall_s": result.sim_wall_s,
        }
    )
    return out


def write_requests_csv(result: SimResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(REQUEST_COLUMNS)
        for r in result.records:
            ttft = r.first_token - r.arrival if r.first_token is not None else None
            e2e = r.finish - r.arrival if r.finish is not None else None
            tpot = (
                (r.finish - r.first_token) / (r.output_tokens - 1)
                if r.finish is not None and r.first_token is not None and r.output_tokens > 1
                else None
            )
            w.writerow(
                (
                    r.rid,
                    f"{r.arrival:.6f}",
                    r.adapter or "",
                    r.prompt_tokens,
                    r.output_tokens,
                    _f(r.first_token),
                    _f(r.finish),
                    _f(ttft),
                    _f(tpot),
                    _f(e2e),
                    r.worker,
                    r.migrations,
                    r.evictions,
                    r.preemptions,
                    "rejected" if r.rejected else ("completed" if r.finish is not None else "unfinished"),
                )
            )


def _f(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def format_summary(s: dict[str, Any]) -> str:
    slo = s["slo_attainment"]
    lines = [
        f"policy {s['policy']}  profile {s['profile']}",
        f"requests {s['requests']}  completed {s['completed']}  rejected {s['rejected']}  "
        f"over {s['duration_s']:.1f} s",
        f"throughput {s['throughput_tok_s']:.1f} tok/s  {s['throughput_req_s']:.2f} req/s",
        "latency (ms)       p50        p90        p99       mean",
    ]
    for name in ("ttft", "tpot", "e2e"):
        row = [_ms(s[f"{name}_p{q}_s"]) for q in (50, 90, 99)] + [_ms(s[f"{name}_mean_s"])]
        lines.append(f"  {name.upper():<8}" + "".join(f"{v:>11}" for v in row))
    lines += [
        f"SLO (TTFT <= {s['slo_ttft_s']} s, TPOT <= {s['slo_tpot_s']} s): "
        + ("-" if slo is None else f"{slo * 100:.1f}% of requests"),
        f"GPU-seconds {s['gpu_seconds']:.1f}  peak GPUs {s['peak_gpus']}  migrations {s['migrations']}  "
        f"evictions {s['evictions']}  preemptions {s['preemptions']}  adapter loads {s['adapter_loads']}",
        f"simulated in {s['sim_wall_s']:.2f} s",
    ]
    return "\n".join(lines)


def format_compare(summaries: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'policy':<26}{'GPU-s':>10}{'peak':>6}{'SLO %':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'TPOT p50':>10}{'TPOT p99':>10}{'migr':>7}{'evict':>7}{'preempt':>8}"
    )
    lines = [head, "(latencies in ms)"]
    for s in summaries:
        slo = s["slo_attainment"]
        lines.append(
            f"{s['policy']:<26}{s['gpu_seconds']:>10.1f}{s['peak_gpus']:>6}"
            f"{'-' if slo is None else f'{slo * 100:.1f}':>8}"
            f"{_ms(s['ttft_p50_s']):>10}{_ms(s['ttft_p99_s']):>10}{_ms(s['tpot_p50_s']):>10}"
            f"{_ms(s['tpot_p99_s']):>10}{s['migrations']:>7}{s['evictions']:>7}{s['preemptions']:>8}"
        )
    return "\n".join(lines)
