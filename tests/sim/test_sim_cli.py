"""`lorafleet sim` end to end on small inputs: outputs, --json, --compare, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.cli import main

HERE = Path(__file__).parent
PROFILE = str(HERE / "tiny_profile.yaml")
JSON_KEYS = (
    "requests",
    "completed",
    "throughput_tok_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "gpu_seconds",
    "peak_gpus",
    "migrations",
    "sim_wall_s",
)


def _trace(tmp_path: Path, n: int = 200) -> Path:
    lines = ["timestamp_s,prompt_tokens,output_tokens"]
    lines += [f"{i * 0.05:.3f},{8 + i % 40},{1 + i % 30}" for i in range(n)]
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sim_writes_its_outputs_and_a_json_last_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = ["sim", "--trace", str(_trace(tmp_path)), "--profile", PROFILE, "--max-gpus", "4"]
    rc = main([*argv, "--out", str(out), "--json", "--quiet", "--adapters", "5"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(k in last for k in JSON_KEYS)
    assert last["requests"] == last["completed"] == 200
    assert last["peak_gpus"] <= 4
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == 201 and rows[0].startswith("request_id,arrival_s,adapter")
    assert (out / "gpus.png").stat().st_size > 1000 and (out / "latency_cdf.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["completed"] == 200


def test_compare_prints_one_table_over_every_policy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["sim", "--trace", str(_trace(tmp_path, 80)), "--profile", PROFILE, "--max-gpus", "3"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--compare", "--no-plots", "--quiet", "--json"]) == 0
    text = capsys.readouterr().out
    for label in ("packing", "packing-no-migration", "least_loaded", "round_robin", "random"):
        assert f"\n{label} " in text
    assert set(json.loads(text.strip().splitlines()[-1])["compare"]) >= {"packing", "round_robin"}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--profile", "no-such-profile"], "no-such-profile"),
        (["--max-gpus", "0"], "max_gpus"),
        (["--popularity", "zipf"], "--popularity"),
        (["--rate-scale", "-1"], "rate_scale"),
        (["--max-batch-size", "5"], "--max-batch-size must be in [1, 4]"),
        (["--max-batch-size", "0"], "--max-batch-size must be in [1, 4]"),
        (["--pack-batch-target", "5"], "--pack-batch-target must be in [1, 4]"),
        (["--pack-batch-target", "0"], "--pack-batch-target must be in [1, 4]"),
        (["--max-batch-size", "2", "--pack-batch-target", "3"], "--pack-batch-target must be in [1, 2]"),
    ],
)
def test_bad_input_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], match: str
) -> None:
    base = {"--profile": PROFILE, "--max-gpus": "2"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["sim", "--trace", str(_trace(tmp_path, 5)), "--out", str(tmp_path / "o"), "--quiet"]
    for flag, value in base.items():
        argv += [flag, value]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorafleet: error: ") and match in err[0]


def test_bad_trace_row_names_file_row_and_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp_s,prompt_tokens,output_tokens\n0,5,3\n1,5,-1\n")
    argv = ["sim", "--trace", str(bad), "--profile", PROFILE, "--max-gpus", "2", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert f"lorafleet: error: {bad}: row 3, column output_tokens: negative length" in capsys.readouterr().err


def test_a_lower_batch_limit_caps_each_worker(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--max-batch-size 1 runs one sequence per worker step: with one GPU the requests queue, so
    the mean TTFT grows against the profile's batch of 4."""
    ttft = {}
    for limit in ("4", "1"):
        argv = ["sim", "--trace", str(_trace(tmp_path, 60)), "--profile", PROFILE, "--max-gpus", "1"]
        argv += ["--out", str(tmp_path / limit), "--json", "--quiet", "--no-plots", "--max-batch-size", limit]
        assert main(argv) == 0
        ttft[limit] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ttft_mean_s"]
    assert ttft["1"] > ttft["4"]


def test_a_batch_target_spreads_load_over_more_workers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--pack-batch-target 1: each worker is filled to one sequence before the next is used, so the
    fleet grows further than with packing to the batch limit of 4, and steps are shorter."""
    got = {}
    for target in (None, "1"):
        argv = ["sim", "--trace", str(_trace(tmp_path, 200)), "--profile", PROFILE, "--max-gpus", "6"]
        argv += ["--out", str(tmp_path / str(target)), "--json", "--quiet", "--no-plots"]
        if target is not None:
            argv += ["--pack-batch-target", target]
        assert main(argv) == 0
        got[target] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["1"]["policy"] == "packing-target1" and got["1"]["pack_batch_target"] == 1
    assert got[None]["pack_batch_target"] is None
    assert got["1"]["completed"] == got[None]["completed"] == 200
    assert got["1"]["peak_gpus"] > got[None]["peak_gpus"]
    assert got["1"]["tpot_mean_s"] < got[None]["tpot_mean_s"]
