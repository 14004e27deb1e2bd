"""bench_fleet.py's kill pair (--kill-dtype) and --skip without a fleet: the pair's sizing, the budget
walk of the GPU profile with the second H200 run's measured costs, and the pair's report."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
NAMES = (
    "fleet_plan",
    "fleet_pair",
    "fleet_settings",
    "fleet_tokens",
    "fleet_tables",
    "fleet_report",
    "bench_fleet",
)


@pytest.fixture
def mods(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the fleet_*.py modules import each other by name
    yield {n: importlib.import_module(n) for n in NAMES}
    for n in (*NAMES, "fleet_run", "fleet_server", "fleet_assets", "fleet_delivery", "fleet_migration"):
        sys.modules.pop(n, None)


def test_pair_prefix_is_the_longest_that_fits(mods) -> None:
    pair = mods["fleet_pair"]
    arrivals = [0.5 * i for i in range(4)] + [2.0 + 0.05 * i for i in range(200)]  # burst from 2 s
    # One worker serves 2 requests/s: n requests cost about n/4 s (both workers) + n/2 s (after the kill).
    plan = pair.size_pair(arrivals, 2.0, 60.0, 2.0, kill_min_running=8, batch_cap=16)
    cost = pair.replay_estimate(arrivals, plan.requests, 2.0, 2.0) + pair.replay_estimate(
        arrivals, plan.requests, 2.0, 1.0
    )
    more = pair.replay_estimate(arrivals, plan.requests + 1, 2.0, 2.0) + pair.replay_estimate(
        arrivals, plan.requests + 1, 2.0, 1.0
    )
    assert cost <= 60.0 < more and 70 <= plan.requests <= 80
    # The kill waits for a third of the prefix on one worker, at most a full batch, at least the rule's.
    assert plan.kill_min_running == 16
    assert pair.size_pair(arrivals, 2.0, 20.0, 2.0, 8, 16).kill_min_running == 8
    assert (plan.reference_s, plan.kill_s) == pytest.approx(
        (plan.requests / 4 + 0.5, plan.requests / 2 + 0.5)
    )
    # Time enough for all: the whole plan, no more.
    assert pair.size_pair(arrivals, 2.0, 1e6, 2.0, 8, 16).requests == len(arrivals)
    # A replay cannot end before its last request is sent.
    assert pair.replay_estimate([0.0, 30.0], 2, 100.0, 2.0) == pytest.approx(30.01)
    # Too little time for 2 x kill_min_running requests into the burst: a clear refusal.
    with pytest.raises(ValueError, match=r"shortest prefix \(20 requests, 16 into the burst\)"):
        pair.size_pair(arrivals, 2.0, 5.0, 2.0, 8, 16)
    with pytest.raises(ValueError, match="> 0"):
        pair.size_pair(arrivals, 2.0, 60.0, 0.0, 8, 16)
    with pytest.raises(ValueError, match="sorted"):
        pair.size_pair([1.0, 0.5], 0.0, 60.0, 1.0, 1, 4)
    assert pair.pair_names("float32") == ("packing-f32", "packing-f32-kill")
    with pytest.raises(ValueError, match="no kill pair"):
        pair.pair_names("int8")


def test_skip_and_kill_dtype_flags(mods, tmp_path: Path) -> None:
    st = mods["fleet_settings"]
    trace = tmp_path / "t.csv"
    trace.write_text("x")
    base = ["--out", str(tmp_path), "--trace", str(trace), "--servegen", str(tmp_path)]

    def parse(*flags: str):
        return st.settings(st.build_parser().parse_args([*base, *flags]))[1]

    extra = parse("--kill-dtype", "float32", "--skip", "migration, delivery")
    assert extra["kill_dtype"] == "float32" and extra["skip"] == {"migration", "delivery"}
    assert parse()["skip"] == set() and parse()["kill_dtype"] is None
    # The old flags are the same as --skip; --no-migration leaves the delivery measurement no fleet.
    assert parse("--no-migration")["skip"] == {"migration", "delivery"}
    assert parse("--no-kill", "--no-delivery")["skip"] == {"kill", "delivery"}
    with pytest.raises(ValueError, match="--skip takes some of kill, migration, delivery, got migrate"):
        parse("--skip", "migrate")
    with pytest.raises(ValueError, match="cannot go with --skip kill"):
        parse("--kill-dtype", "float32", "--skip", "kill")
    with pytest.raises(SystemExit):
        st.build_parser().parse_args([*base, "--kill-dtype", "int8"])


def _bench(mods, tmp_path: Path, *flags: str):
    """A FleetBench of the GPU profile with a clock that says how much of the budget is left."""
    st, bf = mods["fleet_settings"], mods["bench_fleet"]
    trace = tmp_path / "t.csv"
    trace.write_text("x")
    args = st.build_parser().parse_args(
        ["--out", str(tmp_path), "--trace", str(trace), "--servegen", str(tmp_path), *flags]
    )
    prof, extra = st.settings(args)
    bench = bf.FleetBench(prof, extra, args, tmp_path)
    bench.save = lambda: None
    bench.log = lambda message: None
    left = [prof.budget_s]
    bench.left_s = lambda: left[0]
    TraceRow = importlib.import_module("lorafleet.bench.workload").TraceRow
    bench.rows = [TraceRow(at_s=float(i), context_tokens=780, generated_tokens=109) for i in range(100)]
    return bench, left


def test_gpu_budget_holds_three_bf16_runs_and_the_float32_pair(mods, tmp_path: Path) -> None:
    """The walk of FLEET_BUDGET_S=515 with the second H200 run's costs: first server 51 s, its
    untimed pass and warm-up ~20 s, later bf16 runs 97-103 s besides ... as measured there."""
    Warmup = importlib.import_module("fleet_run").Warmup
    plan = mods["fleet_plan"]
    bench, left = _bench(
        mods, tmp_path, "--time-budget-s", "515", "--kill-dtype", "float32", "--skip", "migration,delivery"
    )
    left[0] = 515.0 - 70.0  # the first server's start, untimed pass and warm-up
    phases = bench.choose_phases(Warmup(4.5, 2264.0, 1.3), 51.0)
    start, end, plan_s = plan.burst_window(phases)
    q1, burst, q2 = start, end - start, plan_s - end
    # The burst keeps most of its 27 s, and the quiet after it the 25 s that hold the release.
    assert burst >= 20.0 and q2 >= 25.0 - 1e-6 and q1 > 0
    # The three bf16 runs as measured (133, 102, 107 s with a 56 s plan), shortened to this plan.
    spent = 70.0 + (133.0 - 70.0 - 56.4 + plan_s) + (102.0 - 56.4 + plan_s) + (107.0 - 56.4 + plan_s)
    left[0] = 515.0 - spent
    sent = [i / 4.0 for i in range(int(4 * start))]
    sent += [start + i / 22.0 for i in range(int(22 * (end - start)))]
    sent += [end + i / 4.0 for i in range(int(4 * (plan_s - end)))]
    bench.result["runs"] = [
        {"name": "packing", "burst": [start, end], "requests": [{"sent": t} for t in sent]}
    ]
    pair = bench.size_kill_pair()
    assert pair is not None and 40 <= pair.requests < len(sent)
    assert pair.kill_min_running == pair.requests // 3
    # The pair's server: float32, both workers from the start, the prefix, the pair's kill rule.
    bench.assets = argparse.Namespace(model_dir=tmp_path / "model", adapters_dir=tmp_path / "adapters")
    spec = bench.spec("packing-f32-kill", "packing", True, pair)
    serve = " ".join(spec.serve_args)
    assert "--dtype float32 --workers 2 --max-workers 2" in serve and spec.max_requests == pair.requests
    assert spec.kill_min_running == pair.kill_min_running and spec.prewarm_s == 0
    policy = bench.spec("least_loaded", "least_loaded", False)
    assert "--dtype bfloat16 --workers 1" in " ".join(policy.serve_args) and policy.max_requests is None
    # What the pair costs on the estimates fits what the bf16 runs left, with the 10 s reserve.
    assert 2 * bench.pair_fixed_s() + pair.reference_s + pair.kill_s <= left[0] - 10.0


def test_without_time_for_the_pair_it_is_skipped_with_a_note(mods, tmp_path: Path) -> None:
    bench, left = _bench(mods, tmp_path, "--kill-dtype", "float32")
    bench.result["sizing"] = {"one_worker_requests_per_s": 20.0, "rates": [4.0, 22.0]}
    bench.result["runs"] = [
        {"name": "packing", "burst": [3.0, 30.0], "requests": [{"sent": 0.1 * i} for i in range(500)]}
    ]
    left[0] = 60.0
    assert bench.size_kill_pair() is None
    assert bench.result["notes"][-1].startswith("skipped the kill pair: the kill pair needs")
    bench.result["runs"] = []
    assert bench.size_kill_pair() is None and "no packing run" in bench.result["notes"][-1]


def test_pair_report_judges_raw_tokens(mods, tmp_path: Path) -> None:
    tok, tables = mods["fleet_tokens"], mods["fleet_tables"]

    def run(name: str, tokens: list[list[int]], statuses: list[str]) -> dict:
        reqs = [
            {"adapter": "a", "prompt_len": 8, "status": s, "token_ids": t, "top_gaps": [0.3] * len(t)}
            for t, s in zip(tokens, statuses)
        ]
        return {"name": name, "requests": reqs}

    ref = run("packing-f32", [[1, 2], [3, 4], [5]], ["ok", "ok", "ok"])
    same = run("packing-f32-kill", [[1, 2], [3, 4], [5]], ["ok", "ok", "unfinished"])
    out = tok.compare_runs(ref, same, 0.05)
    assert (out["lost"], out["cut_off"], out["compared"], out["differ"]) == (0, 1, 2, 0)
    kill = {**out, "pid": 7, "victim_running": 9, "judge": "raw"}
    assert tables.kill_targets(kill) == [
        "- killed worker (9 sequences on it), packing-f32 against packing-f32-kill: 0 lost; 1 not completed "
        "in both runs (the time budget), not judged, 0 of 2 requests with any token different (raw; 0 "
        "before their first "
        "near-tie (gap < 0.05 nats)): **met**"
    ]
    # One token different anywhere fails the raw rule, though it is after a near-tie.
    other = run("packing-f32-kill", [[1, 2], [3, 9], [5]], ["ok", "ok", "internal"])
    out = tok.compare_runs(ref, other, 0.5)
    assert (out["lost"], out["differ"], out["decisive"]["differ"]) == (1, 1, 0)
    assert tables.kill_targets({**out, "pid": 7, "judge": "raw"})[0].endswith("**not met**")


def test_render_shows_the_pair_apart_from_the_policy_runs(mods, tmp_path: Path) -> None:
    bf, st = mods["bench_fleet"], mods["fleet_settings"]
    quant = {"p50": 0.1, "p90": 0.2, "p99": 0.3}

    def run(name: str, pair: bool) -> dict:
        reqs = [
            {
                "adapter": "a",
                "prompt_len": 8,
                "sent": 1.0,
                "first": 1.1,
                "done": 2.0,
                "tokens": 2,
                "status": "ok",
                "error": "",
                "token_ids": [1, 2],
                "top_gaps": [1.0, 1.0],
            }
        ]
        sample = {
            "t": 0.0,
            "alive": 2,
            "busy": 1,
            "running": [1, 0],
            "pids": [1, 2],
            "states": ["active"] * 2,
            "queue_len": 0,
            "migrations": 0,
            "workers_released": 0,
            "worker_deaths": 0,
            "resumed_after_fault": 0,
            "requests_completed": 0,
            "requests_failed": 0,
            "tokens_generated": 0,
        }
        bench = {
            "requests": 1,
            "completed": 1,
            "errors": {},
            "requests_per_s": 1.0,
            "ttft_s": quant,
            "tpot_s": quant,
            "clamped": 0,
        }
        return {
            "name": name,
            "policy": "packing",
            "samples": [sample],
            "requests": reqs,
            "window_s": 10.0,
            "burst": [1.0, 5.0],
            "bench_command": "lorafleet bench",
            "bench": bench,
            "pair": pair,
            "dtype": "float32" if pair else "bfloat16",
            "plan_requests": 40 if pair else None,
        }

    runs = [run("packing", False), run("packing-f32", True), run("packing-f32-kill", True)]
    runs[2]["kill"] = {"at_s": 2.0, "pid": 5, "victim_running": 1, "workers_at_kill": 2, "running_at_kill": 1}
    kill = {**mods["fleet_tokens"].compare_runs(runs[1], runs[2], 0.05), **runs[2]["kill"]}
    kill.update(resumed_after_fault=1, worker_deaths=1, noise_floor=[], judge="raw")
    result = {
        "command": "x",
        "machine": {"host": "h", "cpus": 2, "gpus": [], "python": "3", "date_utc": "d"},
        "load_average_start": [1.0, 1.0, 1.0],
        "profile": dict(vars(st.PROFILES["gpu"])),
        "stages": {},
        "runs": runs,
        "kill": kill,
        "notes": [],
        "kill_pair": {
            "requests": 1,
            "reference_s": 3.0,
            "kill_s": 5.0,
            "worker_requests_per_s": 2.5,
            "kill_min_running": 8,
            "dtype": "float32",
            "fixed_s": 70.0,
        },
    }
    (tmp_path / "fleet.json").write_text(json.dumps(result))
    bf.render(tmp_path)
    md = (tmp_path / "fleet.md").read_text()
    policy = md.split("The kill pair (")[0]
    pair = md.split("The kill pair (float32, packing; both workers from the start; the plan's first 1 of 40")[
        1
    ]
    assert "| packing | 20.0 | 1.00x |" in policy and "packing-f32" not in policy
    assert "| packing-f32 | 20.0 | – |" in pair and "| packing-f32-kill |" in pair
    assert (
        "Greedy tokens against the packing-f32 run" in md
        and "Worker killed mid-burst (packing-f32-kill;" in md
    )
    assert "0 of 1 requests with any token different (raw" in md and "**met**" in md
    assert "| – (both workers throughout) |" in pair
    assert "(an estimate); the kill waits for a worker holding 8; GPU-seconds" in md
