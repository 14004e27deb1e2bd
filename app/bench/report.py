"""Human-readable tables: `lorafleet status` and the bench / demo summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafleet.serving.api_types import ClusterView

if TYPE_CHECKING:
    from lorafleet.bench.runner import BenchReport, WorkerSample


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_status(status: ClusterView) -> str:
    rows = [["worker", "state", "running", "kv free", "adapters"]]
    for w in status.workers:
        adapters = ", ".join(w.resident_adapters[:6]) + (" ..." if len(w.resident_adapters) > 6 else "")
        rows.append(
            [
                w.worker_id,
                w.state + (f" ({w.last_error})" if w.last_error else ""),
                f"{w.num_running}/{w.max_batch_size}",
                f"{w.free_kv_blocks}/{w.total_kv_blocks}",
                adapters or "-",
            ]
        )
    c, m = status.counters, status.model
    lines = [
        f"model {m.name} (vocab {m.vocab_size}, context {m.max_context_tokens})",
        _table(rows) if status.workers else "(no workers)",
        f"queue: {status.queue_len}",
        f"requests: {c.requests_completed} completed, {c.requests_aborted} aborted, "
        f"{c.requests_failed} failed, {c.requests_rejected} rejected; {c.tokens_generated} tokens",
        f"migrations {c.migrations}, evictions {c.evictions}, preemptions {c.preemptions}; "
        f"adapter loads {c.adapter_loads} "
        f"(cache hits {c.adapter_cache_hits}, misses {c.adapter_cache_misses})",
    ]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def workers_timeline(samples: list[WorkerSample], buckets: int = 12) -> str:
    """Busy workers over the run: the maximum in each of up to `buckets` equal time slices."""
    if not samples:
        return "(no samples)"
    end = max(s.t_s for s in samples) or 1.0
    step = end / buckets
    slices: list[int] = []
    for i in range(buckets):
        inside = [
            s.busy
            for s in samples
            if i * step <= s.t_s < (i + 1) * step or (i == buckets - 1 and s.t_s == end)
        ]
        slices.append(max(inside) if inside else (slices[-1] if slices else 0))
    return " ".join(str(n) for n in slices) + f"   (max busy per {step:.1f} s slice)"


def _client_cpu(report: BenchReport) -> str:
    per_token = (
        f", {1e6 * report.client_cpu_s / report.generated_tokens:.0f} us/token"
        if report.generated_tokens
        else ""
    )
    return f"{report.client_cpu_s:.2f} s{per_token}"


def format_bench(report: BenchReport) -> str:
    rows = [
        ["metric", "value"],
        ["requests", f"{report.completed}/{report.requests} completed"],
        ["errors", ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"],
        ["wall time", f"{report.wall_s:.1f} s"],
        ["throughput", f"{report.tokens_per_s:.1f} tokens/s, {report.requests_per_s:.2f} requests/s"],
        ["TTFT p50 / p90 / p99", " / ".join(_ms(report.ttft_s[k]) for k in ("p50", "p90", "p99"))],
        ["TPOT p50 / p90 / p99", " / ".join(_ms(report.tpot_s[k]) for k in ("p50", "p90", "p99"))],
        ["latency p50 / p90 / p99", " / ".join(_ms(report.e2e_s[k]) for k in ("p50", "p90", "p99"))],
        ["adapters used", str(report.adapters_used)],
        ["workers busy (max / mean)", f"{report.max_busy_workers} / {report.mean_busy_workers:.2f}"],
        ["workers busy over time", workers_timeline(report.workers_over_time)],
        ["migrations", str(report.migrations)],
        ["preemptions", str(report.preemptions)],
        ["client CPU", _client_cpu(report)],
    ]
    if report.clamped:
        rows.append(["lengths clamped to the model", str(report.clamped)])
    text = _table(rows)
    if report.first_errors:
        text += "\nfirst errors:\n" + "\n".join(f"  {e}" for e in report.first_errors)
    return text
