"""benchmarks/sim_equal_slo.py: the plan of runs, picking each family's setting at a common SLO
attainment, and one tiny sweep end to end (tiny profile, synthetic trace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PROFILE = str(Path(__file__).parent / "tiny_profile.yaml")


@pytest.fixture
def study(bench_import):
    return bench_import("sim_equal_slo")


def _run(family: str, target: int | None, cap: int, gpu_s: float, slo: float) -> dict:
    return {
        "family": family,
        "pack_batch_target": target,
        "max_gpus": cap,
        "key": f"{family}-{target}-{cap}",
        "gpu_seconds": gpu_s,
        "slo_attainment": slo,
        **{m: gpu_s / 1000 for m in ("peak_gpus", "ttft_p99_s", "tpot_p99_s", "ttft_p50_s", "tpot_p50_s")},
    }


def test_the_plan_maps_a_target_at_the_limit_to_off(study) -> None:
    argv = ["--synthetic", "--profile", PROFILE, "--max-gpus", "8", "--out", "x", "--pack-targets", "2,4"]
    argv += ["--spread-caps", "8,6", "--families", "packing,least_loaded"]
    args = study.parse_args(argv)
    keys = [p.key for p in study.plan_points(args, limit=4)]
    assert keys == [
        "packing-target2-max8",
        "packing-targetlimit-max8",
        "least_loaded-targetlimit-max8",
        "least_loaded-targetlimit-max6",
    ]


def test_interpolation_between_the_settings_that_bracket_the_level(study) -> None:
    runs = [
        _run("packing", None, 64, 100.0, 0.90),
        _run("packing", 32, 64, 140.0, 0.96),
        _run("packing", 16, 64, 200.0, 0.99),
    ]
    pick = study.at_attainment("packing", runs, 0.97)
    assert pick["cheapest"]["pack_batch_target"] == 16
    assert pick["interpolated"]["gpu_seconds"] == pytest.approx(160.0)
    assert pick["interpolated"]["between"] == ["packing-32-64", "packing-16-64"]
    caps = [_run("least_loaded", None, 64, 150.0, 0.98), _run("least_loaded", None, 40, 120.0, 0.94)]
    pick = study.at_attainment("least_loaded", caps, 0.95)
    assert pick["interpolated"]["gpu_seconds"] == pytest.approx(127.5)
    above = study.at_attainment("least_loaded", caps, 0.90)
    assert above["interpolated"] is None and "already exceeds" in above["note"]
    assert above["cheapest"]["max_gpus"] == 40
    out_of_reach = study.at_attainment("least_loaded", caps, 0.99)
    assert out_of_reach["cheapest"] is None and "brackets" in out_of_reach["note"]


def test_bad_flags_are_refused(study) -> None:
    base = ["--synthetic", "--profile", PROFILE, "--max-gpus", "4", "--out", "x"]
    for extra in (["--families", "best"], ["--spread-caps", "5"], ["--attainment", "1.5"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            study.parse_args([*base, *extra])


def test_a_tiny_sweep_end_to_end(study, tmp_path: Path) -> None:
    argv = ["--synthetic", "--rate", "20", "--duration", "20", "--period", "20", "--profile", PROFILE]
    argv += ["--max-gpus", "4", "--out", str(tmp_path), "--prompt-len", "8:40", "--output-len", "4:20"]
    argv += ["--pack-targets", "1,4", "--spread-caps", "4,2", "--families", "packing,least_loaded"]
    argv += ["--attainment", "0.5", "--no-plots"]
    assert study.main(argv) == 0
    data = json.loads((tmp_path / "study.json").read_text())
    assert len(data["runs"]) == 4 and len(list((tmp_path / "runs").glob("*.npz"))) == 4
    by_key = {r["key"]: r for r in data["runs"]}
    assert by_key["packing-target1-max4"]["peak_gpus"] >= by_key["packing-targetlimit-max4"]["peak_gpus"]
    assert by_key["least_loaded-targetlimit-max2"]["peak_gpus"] <= 2
    assert "### At 50% SLO attainment" in (tmp_path / "study.md").read_text()
    assert study.main(argv) == 0  # a second call keeps every run
