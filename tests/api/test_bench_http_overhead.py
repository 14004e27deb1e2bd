"""benchmarks/bench_http_overhead.py's bookkeeping: CPU deltas, medians, paired gaps, the verdict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def bench(bench_import) -> Any:
    return bench_import("bench_http_overhead")


def run(bench: Any, pair: int, api: str, tps: float, itl: float, **kw: Any) -> Any:
    fields = dict(
        pair=pair, api=api, load_1min=1.0, tokens_per_s=tps, itl_p50_ms=itl, ttft_p50_ms=5.0,
        completed=64, requests=64, errors={}, head_cpu_s=2.0, rest_cpu_s=4.0, client_cpu_s=0.8,
        client_process_cpu_s=1.5, generated_tokens=16384,
    )  # fmt: skip
    return bench.Run(**{**fields, **kw})


META = {
    "cpu": "test cpu",
    "cores": 16,
    "date": "d",
    "python": "3",
    "versions": "v",
    "command": "c",
    "bench": "b",
}


def test_cpu_delta_splits_head_from_the_rest_and_counts_new_processes(bench: Any) -> None:
    before = {10: 1.0, 11: 2.0, 12: 5.0}
    after = {10: 1.5, 11: 2.25, 13: 0.5}  # 12 exited (not counted), 13 is new (from 0)
    assert bench.cpu_delta(before, after, 10) == (0.5, 0.75)
    tree = bench.tree_cpu_s(os.getpid())  # this process, from /proc
    assert os.getpid() in tree and tree[os.getpid()] > 0


def test_medians_pairs_and_verdict(bench: Any) -> None:
    runs = [
        run(bench, 0, "grpc", 1000, 20.0), run(bench, 0, "http", 980, 20.5),
        run(bench, 1, "http", 900, 22.0), run(bench, 1, "grpc", 1000, 20.0),
        run(bench, 2, "grpc", 1100, 19.0), run(bench, 2, "http", 50, 90.0, completed=60, errors={"x": 4}),
    ]  # fmt: skip
    med = bench.summary(runs)
    assert med["grpc"]["tokens_per_s"] == 1000 and med["grpc"]["runs"] == 3
    assert med["http"]["runs"] == 2 and med["http"]["tokens_per_s"] == 940  # the failed run left out
    assert med["http"]["client_us_per_token"] == pytest.approx(1e6 * 0.8 / 16384)
    ratios, itl = bench.paired_gaps(runs)
    assert ratios == pytest.approx([-0.02, -0.10]) and itl == pytest.approx([0.5, 2.0])
    text = bench.markdown(runs, META)
    assert "tokens/s -6.0%" in text and "p50 inter-token +1.25 ms" in text and "**not met**" in text
    assert "| gRPC | 1,000 / 1,000 / 1,100 | 1,000 |" in text and "| 980 / 900 / failed |" in text
    assert "Failed runs (left out of the medians): pair 2 http: 60/64" in text
    close = [run(bench, 0, "grpc", 1000, 20.0), run(bench, 0, "http", 990, 20.4)]
    assert "**met**" in bench.markdown(close, META)


def test_bad_arguments_are_refused(bench: Any, tmp_path: Path) -> None:
    for bad in (["--pairs", "0"], ["--streams", "0"], ["--output-len", "1"]):
        with pytest.raises(SystemExit):
            bench.parse_args([*bad, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.parse_args(["--pairs", "2"])  # --out is required
    assert bench.parse_args(["--out", str(tmp_path)]).pairs == 5
