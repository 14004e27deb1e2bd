"""benchmarks/sgmv_ab.py: B/A ratios of interleaved bench_sgmv.py runs, per case and summarized."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture
def ab(bench_import):
    return bench_import("sgmv_ab")


def _write(folder: Path, name: str, us: dict[tuple, tuple[float, float, float]]) -> None:
    rows = [
        {"shape": s, "rank": r, "T": t, "popularity": p, "us_add_lora": a, "us_shrink": sh, "us_expand": ex}
        for (s, r, t, p), (a, sh, ex) in us.items()
    ]
    (folder / name).mkdir(parents=True)
    (folder / name / "sgmv.json").write_text(json.dumps({"rows": rows}))


def test_ratios_use_each_sides_median(ab, tmp_path: Path) -> None:
    c1, c2 = ("o4096", 16, 64, "distinct"), ("qkv", 64, 1, "identical")
    _write(tmp_path, "a1", {c1: (10.0, 4.0, 6.0), c2: (20.0, 8.0, 12.0)})
    _write(tmp_path, "a2", {c1: (12.0, 4.0, 6.0), c2: (20.0, 8.0, 12.0)})
    _write(tmp_path, "a3", {c1: (11.0, 4.0, 6.0), c2: (20.0, 8.0, 12.0)})
    _write(tmp_path, "b1", {c1: (11.0, 4.0, 6.6), c2: (20.0, 8.0, 12.0)})
    _write(tmp_path, "b2", {c1: (11.0, 4.0, 6.6), c2: (20.0, 8.0, 12.0)})
    lines, summary = ab.compare(tmp_path)
    assert summary["add_lora"]["worst_b_over_a"] == pytest.approx(1.0)  # A's median 11
    assert summary["add_lora"]["a_spread_median"] == pytest.approx((12 / 10 + 1.0) / 2)
    assert summary["expand"]["worst_b_over_a"] == pytest.approx(1.1)
    assert summary["expand"]["worst_case"] == list(c1)
    assert summary["expand"]["geomean_b_over_a"] == pytest.approx(math.sqrt(1.1))
    assert summary["expand"]["cases_over_1.03"] == 1 and summary["shrink"]["cases_over_1.03"] == 0
    assert any("| o4096 | 16 | 64 | distinct | 6.0 | 6.6 | 1.100 |" in line for line in lines)


def test_missing_side_is_a_clear_error(ab, tmp_path: Path, capsys) -> None:
    _write(tmp_path, "a1", {("o4096", 16, 1, "distinct"): (1.0, 1.0, 1.0)})
    assert ab.main([str(tmp_path)]) == 2
    assert "needs a1.. and b1.." in capsys.readouterr().err
