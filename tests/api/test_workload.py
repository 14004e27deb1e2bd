"""Workloads (Punica popularities, Poisson arrivals, Azure trace replay) and bench statistics."""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lorafleet.bench.progress import ProgressBar
from lorafleet.bench.report import format_bench, workers_timeline
from lorafleet.bench.runner import RequestRecord, WorkerSample, summarize
from lorafleet.bench.workload import (
    adapter_indices,
    percentile,
    phased_workload,
    poisson_arrivals,
    prompt_token_ids,
    read_azure_trace,
    synthetic_workload,
    trace_workload,
)

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"


def test_popularities() -> None:
    rng = random.Random(0)
    n = 2_000
    assert adapter_indices("distinct", n, rng) == list(range(n))
    assert set(adapter_indices("identical", n, rng)) == {0}
    uniform = Counter(adapter_indices("uniform", n, rng))
    assert len(uniform) == math.ceil(math.sqrt(n))
    assert max(uniform.values()) < 3 * n / len(uniform)
    skewed = Counter(adapter_indices("skewed", n, rng))
    zeta = sum(k**-1.5 for k in range(1, n + 1))
    assert skewed[0] / n == pytest.approx(1 / zeta, abs=0.05)  # Zipf 1.5: the top adapter ~ 38%
    assert skewed[0] / skewed[1] == pytest.approx(2**1.5, rel=0.25)
    with pytest.raises(ValueError, match="popularity"):
        adapter_indices("zipfy", 3, rng)


def test_poisson_arrivals_rate_and_bounds() -> None:
    arrivals = poisson_arrivals(20.0, 50.0, random.Random(1))
    assert arrivals == sorted(arrivals) and all(0 <= t < 50 for t in arrivals)
    assert len(arrivals) == pytest.approx(1000, rel=0.1)
    assert len(poisson_arrivals(20.0, 50.0, random.Random(1), limit=7)) == 7
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, 1.0, random.Random(0))


def test_synthetic_and_phased_workloads() -> None:
    plan = synthetic_workload(
        popularity="uniform", rate=10, duration_s=5, prompt_len=(4, 9), output_len=(2, 3)
    )
    assert plan == synthetic_workload(
        popularity="uniform", rate=10, duration_s=5, prompt_len=(4, 9), output_len=(2, 3)
    )
    assert all(4 <= p.prompt_len <= 9 and 2 <= p.max_new_tokens <= 3 for p in plan)
    with pytest.raises(ValueError, match="prompt_len"):
        synthetic_workload(popularity="uniform", rate=1, duration_s=1, prompt_len=(5, 2))
    phased = phased_workload([(2.0, 10.0), (40.0, 10.0), (2.0, 10.0)], popularity="identical")
    burst = [p for p in phased if 10 <= p.at_s < 20]
    assert len(burst) > 5 * len([p for p in phased if p.at_s < 10])


def test_prompt_ids_stay_in_vocab() -> None:
    ids = prompt_token_ids(500, 50, random.Random(0))
    assert len(ids) == 500 and all(3 <= t < 50 for t in ids)


def test_read_small_azure_trace_and_replay(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:04.0000000,100,10\n"
        "2023-11-16 18:17:03.5000000,5000,400\n"
        "2023-11-16 18:17:06.2500001,20,0\n"
    )
    rows = read_azure_trace(csv)
    assert [r.at_s for r in rows] == pytest.approx([0.0, 0.5, 2.7500001])
    assert rows[0].context_tokens == 5000
    plan, clamped = trace_workload(
        rows, popularity="identical", max_context_tokens=512, max_new_tokens_cap=64
    )
    assert [(p.prompt_len, p.max_new_tokens) for p in plan] == [(447, 64), (100, 10), (20, 1)]
    assert clamped == 2
    assert all(p.prompt_len + p.max_new_tokens < 512 for p in plan)
    faster, _ = trace_workload(rows, popularity="identical", rate=2.0, max_context_tokens=512)
    assert faster[-1].at_s == pytest.approx(1.0)  # 2 gaps in 2.75 s -> 2 req/s means 1 s
    short, _ = trace_workload(rows, popularity="identical", duration_s=1.0, max_context_tokens=512)
    assert len(short) == 2


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("a,b,c\n1,2,3\n", "missing column"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n", "TIMESTAMP"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:04.0,x,2\n", "integers"),
    ],
)
def test_bad_traces_are_named(tmp_path: Path, content: str, needle: str) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(ValueError, match=needle):
        read_azure_trace(csv)
    with pytest.raises(ValueError, match="does not exist"):
        read_azure_trace(tmp_path / "missing.csv")


@pytest.mark.skipif(not (TRACES / "azure_llm_2023_code.csv").is_file(), reason="shared traces absent")
def test_real_azure_code_trace() -> None:
    rows = read_azure_trace(TRACES / "azure_llm_2023_code.csv")
    assert len(rows) == 8_819
    rate = (len(rows) - 1) / rows[-1].at_s
    assert 2.0 < rate < 3.2  # the README's ~2.6 req/s
    plan, clamped = trace_workload(rows, popularity="skewed", rate=10.0, max_context_tokens=512)
    assert plan[-1].at_s == pytest.approx((len(rows) - 1) / 10.0)  # rescaled to a mean of 10 req/s
    assert clamped > len(rows) / 2  # median context 1,469 tokens does not fit a 512-token model
    assert all(p.prompt_len + p.max_new_tokens < 512 for p in plan)


def test_percentile_matches_numpy() -> None:
    values = [random.Random(3).random() for _ in range(101)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None


def test_summary_statistics() -> None:
    records = [
        RequestRecord("a", 4, sent_at=0.0, first_token_at=0.1, last_token_at=0.5, done_at=0.5, tokens=5),
        RequestRecord("b", 4, sent_at=1.0, first_token_at=1.3, last_token_at=1.3, done_at=1.3, tokens=1),
        RequestRecord("a", 4, sent_at=2.0, done_at=2.1, status="not_found", error="unknown adapter"),
    ]
    samples = [WorkerSample(0.0, 2, 1, 1, 0), WorkerSample(1.0, 2, 2, 3, 1), WorkerSample(2.0, 2, 0, 0, 0)]
    report = summarize(records, wall_s=3.0, samples=samples, counters={"migrations": 4})
    assert (report.requests, report.completed, report.errors) == (3, 2, {"not_found": 1})
    assert report.generated_tokens == 6 and report.tokens_per_s == pytest.approx(2.0)
    assert report.ttft_s["p50"] == pytest.approx(0.2)
    assert report.tpot_s["p50"] == pytest.approx(0.1)  # only the 5-token request has a TPOT
    assert report.max_busy_workers == 2 and report.mean_busy_workers == pytest.approx(1.0)
    assert report.migrations == 4 and report.adapters_used == 2
    text = format_bench(report)
    for needle in ("2/3 completed", "not_found 1", "TTFT p50", "TPOT p50", "migrations", "unknown adapter"):
        assert needle in text
    assert workers_timeline(samples, buckets=2).startswith("1 2")


def test_progress_bar_without_a_terminal() -> None:
    out = io.StringIO()
    bar = ProgressBar(20, label="x", stream=out)
    for i in range(20):
        bar.advance(tokens=3, error=i == 0)
    bar.close()
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 11
    assert "20/20 requests" in lines[-1] and "errors 1" in lines[-1]
