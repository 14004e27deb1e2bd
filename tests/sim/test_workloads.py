"""Simulator workloads: the generic CSV's errors, scaling, popularities, ServeGen, Punica cosine."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from lorafleet.sim import workloads as W

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"{TRACES} is absent")


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(text)
    return p


def test_generic_csv_with_and_without_adapters(tmp_path: Path) -> None:
    rows = W.load_rows(
        str(_csv(tmp_path, "timestamp_s,prompt_tokens,output_tokens,adapter\n0,5,3,x\n1.5,7,2,\n"))
    )
    assert rows == [W.Row(0.0, 5, 3, "x"), W.Row(1.5, 7, 2, None)]
    reqs, info = W.build_workload(
        rows, source="t", popularity="identical", num_adapters=None, max_model_len=64
    )
    assert [r.adapter for r in reqs] == ["x", "adapter-0"]
    assert info.adapters == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("timestamp_s,prompt_tokens\n0,5\n", r"row 1: missing column 'output_tokens'"),
        (
            "timestamp_s,prompt_tokens,output_tokens\n0,5,3\n1,-2,3\n",
            r"row 3, column prompt_tokens: negative",
        ),
        ("timestamp_s,prompt_tokens,output_tokens\n2,5,3\n1,2,3\n", r"row 3, column timestamp_s: .*before"),
        ("timestamp_s,prompt_tokens,output_tokens\nx,5,3\n", r"row 2, column timestamp_s"),
        ("timestamp_s,prompt_tokens,output_tokens\n0,5,3.5\n", r"row 2, column output_tokens"),
    ],
)
def test_generic_csv_errors_name_file_row_and_column(tmp_path: Path, text: str, match: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(ValueError, match=match) as err:
        W.load_rows(str(path))
    assert str(path) in str(err.value)


def test_scaling_keeps_the_span_or_stretches_it() -> None:
    rows = [W.Row(float(t), 10, 5) for t in range(1000)]
    more = W.rescale(rows, 3.0, 1.0, random.Random(0))
    assert len(more) == 3000 and more[-1].at_s <= 999.0
    fewer = W.rescale(rows, 0.5, 1.0, random.Random(0))
    assert 400 < len(fewer) < 600
    slow = W.rescale(rows, 1.0, 2.0, random.Random(0))
    assert len(slow) == 1000 and slow[-1].at_s == 1998.0
    with pytest.raises(ValueError, match="rate_scale"):
        W.rescale(rows, 0.0, 1.0, random.Random(0))


def test_lengths_are_clamped_to_the_context_limit() -> None:
    reqs, clamped = W.to_requests([W.Row(0, 500, 500), W.Row(1, 10, 0), W.Row(2, 5, 5)], [None] * 3, 100)
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(1, 99), (10, 1), (5, 5)]
    assert clamped == 2


def test_popularities_over_n_adapters() -> None:
    rows = [W.Row(float(t), 1, 1) for t in range(2000)]
    rng = random.Random(0)
    skewed = Counter(W.assign_adapters(rows, "skewed", 50, rng))
    assert len(skewed) <= 50 and skewed.most_common(1)[0][0] == "adapter-0"
    assert len(set(W.assign_adapters(rows, "distinct", 50, rng))) == 50
    assert len(set(W.assign_adapters(rows, "uniform", 8, rng))) == 8
    with pytest.raises(ValueError, match="popularity"):
        W.assign_adapters(rows, "zipf", None, rng)


def test_cosine_poisson_follows_its_rate() -> None:
    times = W.cosine_poisson(10.0, 400.0, 200.0, 0.9, random.Random(1))
    assert 3400 < len(times) < 4600  # mean 10/s over 400 s
    peak = sum(1 for t in times if t < 20 or 190 <= t < 210)  # around cos = 1
    trough = sum(1 for t in times if 90 <= t < 110 + 20)  # around cos = -1
    assert peak > 3 * trough


def test_servegen_folder(tmp_path: Path) -> None:
    (tmp_path / "chunk-0-trace.csv").write_text("0,2.0,1.0,Gamma,1.0,0.5\n600,0,0,,0,0\n")
    (tmp_path / "chunk-7-trace.csv").write_text("0,0.5,1.0,Weibull,0.8,1.0\n600,1.0,1.0,Weibull,0.8,1.0\n")
    rows = W.load_rows(str(tmp_path), servegen_start_s=0, servegen_span_s=1200, seed=3)
    by = Counter(r.adapter for r in rows)
    assert 1000 < by["tenant-0"] < 1400  # 2/s over the first 600 s only
    assert 700 < by["tenant-7"] < 1100  # 0.5/s then 1/s
    names, weights = W.servegen_popularity(tmp_path, 0, 1200)
    assert names == ["tenant-0", "tenant-7"] and weights == [2.0, 1.5]
    (tmp_path / "chunk-9-trace.csv").write_text("0,1.0,1.0,Lognormal,1,1\n")
    with pytest.raises(ValueError, match=r"chunk-9-trace.csv: row 1, column 4"):
        W.load_rows(str(tmp_path))


@needs_traces
def test_the_azure_traces_load() -> None:
    rows = W.load_rows(str(TRACES / "azure_llm_2023_code.csv"))
    assert len(rows) == 8819 and rows[0].at_s == 0.0
