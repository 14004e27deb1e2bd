"""bench_fleet.py's kill pair (--kill-dtype) and --skip without a fleet: the pair's sizing, the budget
walk of the GPU profile with the second H200 run's measured costs, and the pair's report."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import time
from pathlib import Path

import pytest

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
def mods(bench_import):
    return {n: bench_import(n) for n in NAMES}


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
    assert (
        st.settings(st.build_parser().parse_args([*base, "--pair-max-prompt-tokens", "128"]))[
            0
        ].pair_max_prompt_tokens
        == 128
    )
    assert (
        st.settings(st.build_parser().parse_args([*base, "--pair-rate-margin", "3"]))[0].pair_rate_margin == 3
    )
    with pytest.raises(ValueError, match="--pair-max-prompt-tokens must be >= 1"):
        parse("--pair-max-prompt-tokens", "0")
    with pytest.raises(ValueError, match="--pair-rate-margin must be > 0"):
        parse("--pair-rate-margin", "0")
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


def _arrivals(q1: float, burst: float, q2: float) -> list[float]:
    """The plan's send times at the GPU profile's 4 and 22 requests/s."""
    sent = [i / 4.0 for i in range(int(4 * q1))]
    sent += [q1 + i / 22.0 for i in range(int(22 * burst))]
    return sent + [q1 + burst + i / 4.0 for i in range(int(4 * q2))]


def _at(bench, left: list[float], seconds_left: float) -> None:
    """The budget clock at `seconds_left`, for left_s() and the deadlines size_reference computes."""
    left[0] = seconds_left
    bench.begin = time.monotonic() - (bench.prof.budget_s - seconds_left)


def test_pair_sizes_from_its_own_warmup_and_the_reference_gets_its_time(mods, tmp_path: Path) -> None:
    """The walk of the next GPU call (`--policies packing`, FLEET_BUDGET_S=540) with the first float32
    attempt's costs: the bf16 packing run 127 s, the first float32 server 85 s."""
    Warmup = importlib.import_module("fleet_run").Warmup
    pair_mod, plan_mod = mods["fleet_pair"], mods["fleet_plan"]
    flags = ("--time-budget-s", "540", "--kill-dtype", "float32", "--skip", "migration,delivery")
    bench, left = _bench(mods, tmp_path, *flags, "--policies", "packing")
    _at(bench, left, 540.0 - 75.0)  # the first server's start, untimed pass and warm-up
    phases = bench.choose_phases(Warmup(4.5, 2228.0, 1.3), 57.0)
    start, end, plan_s = plan_mod.burst_window(phases)
    # With no other policy run, the pair's reserve leaves the profile's phases whole.
    assert (start, end - start, plan_s - end) == pytest.approx((3.0, 27.0, 27.0))
    _at(bench, left, 540.0 - 127.0)
    assert bench.fits("the kill pair", bench.pair_fixed_s() + bench.pair_fixed_s(reference=False) + 10.0)
    # The reference: its server up after 85 s, its untimed pass and warm-up 20 s; one float32 worker
    # measured 300 tokens/s (a pessimistic guess: the first attempt's kill run made ~250 at 4x the
    # prompt length).
    _at(bench, left, 540.0 - 127.0 - 105.0)
    arrivals = _arrivals(3.0, 27.0, 27.0)
    # The slices' mean (prefill stalls count) sizes it, not their median; per busy worker.
    assert bench.pair_rate(Warmup(6.0, 400.0, 1.0, 300.0, 2)) == pytest.approx(150.0 / 109 * 0.7)
    n, deadline = bench.size_reference(Warmup(6.0, 400.0, 1.0, 300.0, 1), 85.0, arrivals, 3.0)
    pair = bench.result["kill_pair"]
    least = pair_mod.shortest_prefix(arrivals, 3.0, bench.prof.kill_min_running)
    assert n == pair["requests"] and least < n < len(arrivals)
    assert pair["worker_requests_per_s"] == pytest.approx(300.0 / 109.411 * 0.7, rel=0.01)
    # Both replays, the kill run's start (as long as the reference's), warm-up, tails and stops fit
    # with the 10 s reserve ...
    kill_fixed = bench.pair_fixed_s(85.0, reference=False)
    assert pair["reference_s"] + pair["kill_s"] + kill_fixed + 5.0 + 3.0 <= left[0] - 10.0
    # ... and the reference may run on past its estimate until only the kill run's shortest useful
    # replay is left: the first attempt's reference was cut off 1.7 s into its replay.
    shortest_kill = pair_mod.replay_estimate(arrivals, least, pair["worker_requests_per_s"], 1.0)
    allowed = deadline - time.monotonic()
    assert allowed == pytest.approx(left[0] - 5.0 - kill_fixed - shortest_kill - 3.0 - 10.0, abs=0.5)
    assert allowed > pair["reference_s"] + (pair["kill_s"] - shortest_kill) - 1.0
    # Both pair runs clamp their prompts to 256 tokens and run float32 on both workers; the policy
    # runs keep 1,024. The reference pays the dtype's compiles untimed before its measured warm-up.
    bench.assets = argparse.Namespace(model_dir=tmp_path / "model", adapters_dir=tmp_path / "adapters")
    ref = bench.spec("packing-f32", "packing", False, pair_run=True)
    kill_plan = pair_mod.PairPlan(n, 1.0, 2.0, 1.0, 16)
    kill = bench.spec("packing-f32-kill", "packing", True, kill_plan)
    for spec in (ref, kill):
        assert "--max-prompt-tokens 256" in " ".join(spec.bench_args)
        assert "--dtype float32 --workers 2 --max-workers 2" in " ".join(spec.serve_args)
        assert spec.warmup_s == bench.prof.pair_warmup_s
    assert (ref.prewarm_s, kill.prewarm_s) == (bench.prof.pair_prewarm_s, 0.0)
    assert (ref.max_requests, kill.max_requests, kill.kill_min_running) == (None, n, 16)
    policy = bench.spec("least_loaded", "least_loaded", False)
    assert "--max-prompt-tokens 1024" in " ".join(policy.bench_args) and policy.max_requests is None
    assert "--dtype bfloat16 --workers 1" in " ".join(policy.serve_args)
    # --pack-batch-target reaches the packing run's server only (not the pair, not other policies).
    bench.prof = dataclasses.replace(bench.prof, pack_batch_target=28)
    assert "--pack-batch-target 28" in " ".join(bench.spec("packing", "packing", False).serve_args)
    for spec in (
        bench.spec("round_robin", "round_robin", False),
        bench.spec("p", "packing", False, pair_run=True),
    ):
        assert "--pack-batch-target" not in spec.serve_args


def test_the_first_attempts_timeline_now_skips_the_pair_instead_of_cutting_it(mods, tmp_path: Path) -> None:
    """Three bf16 runs left the first attempt ~200 s: two float32 starts need more, so the pair is
    skipped with a note; before, its reference was cut off and the kill run compared against it."""
    bench, left = _bench(
        mods, tmp_path, "--time-budget-s", "505", "--kill-dtype", "float32", "--skip", "migration,delivery"
    )
    _at(bench, left, 505.0 - 305.0)

    async def no_run(*args, **kwargs) -> None:
        raise AssertionError("no pair run may start")

    bench.one_run = no_run
    asyncio.run(bench.kill_pair())
    assert bench.result["notes"][-1].startswith("skipped the kill pair: 200 s of the budget left, about")


def test_without_time_or_speed_for_the_pair_it_is_skipped_with_a_note(mods, tmp_path: Path) -> None:
    Warmup = importlib.import_module("fleet_run").Warmup
    bench, left = _bench(mods, tmp_path, "--kill-dtype", "float32")
    arrivals = _arrivals(3.0, 27.0, 27.0)
    _at(bench, left, 150.0)
    with pytest.raises(ValueError):
        bench.size_reference(Warmup(6.0, 0.0, 0.0), 85.0, arrivals, 3.0)
    assert "warm-up measured no tokens" in bench.result["notes"][-1]
    with pytest.raises(ValueError):  # 150 s: the kill run's start, warm-up and stop alone take 113 s
        bench.size_reference(Warmup(6.0, 300.0, 1.0), 85.0, arrivals, 3.0)
    assert bench.result["notes"][-1].startswith("skipped the kill pair: the kill pair needs")
    assert "kill_pair" not in bench.result


def test_a_cut_off_reference_shrinks_the_kill_run_to_what_it_completed(mods, tmp_path: Path) -> None:
    """A forced cut-off: the reference completes only its first 30 requests. The kill run replays
    those 30, and the comparison holds only requests completed in both."""
    Warmup = importlib.import_module("fleet_run").Warmup
    bench, left = _bench(
        mods, tmp_path, "--time-budget-s", "505", "--kill-dtype", "float32", "--skip", "migration,delivery"
    )
    arrivals = _arrivals(3.0, 27.0, 27.0)
    _at(bench, left, 400.0)
    calls: list[tuple[str, int | None]] = []

    def request(i: int, status: str) -> dict:
        tokens = [i, i + 1] if status == "ok" else []
        return {"adapter": "a", "prompt_len": 8, "status": status, "token_ids": tokens, "top_gaps": None}

    async def fake_run(name, policy, kill, pair=None, pair_run=False, size_prefix=None) -> None:
        if size_prefix is not None:  # the reference: sized after its warm-up, then cut off after 30
            n, _ = size_prefix(Warmup(6.0, 300.0, 1.0), 85.0, arrivals, 3.0)
            calls.append((name, n))
            statuses = ["ok"] * 30 + ["unfinished"] * 5 + ["unsent"] * (n - 35)
            reqs = [request(i, s) for i, s in enumerate(statuses)]
        else:
            calls.append((name, pair.requests))
            reqs = [request(i, "ok") for i in range(pair.requests)]
        kill_info = {"at_s": 4.0, "pid": 9, "victim_running": 20, "workers_at_kill": 2, "running_at_kill": 20}
        bench.result["runs"].append(
            {
                "name": name,
                "requests": reqs,
                "serve_started_s": 85.0,
                "burst": [3.0, 10.0],
                "kill": kill_info if kill else None,
                "samples": [],
            }
        )

    bench.one_run = fake_run
    asyncio.run(bench.kill_pair())
    (ref_name, n), (kill_name, m) = calls
    assert (ref_name, kill_name) == ("packing-f32", "packing-f32-kill") and n > 35 and m == 30
    assert bench.result["kill_pair"]["kill_run"]["requests"] == 30
    assert any("completed only its first 30 of" in note for note in bench.result["notes"])
    kill = bench.result["kill"]
    assert (kill["compared"], kill["differ"], kill["cut_off"], kill["lost"]) == (30, 0, 0, 0)


def test_kill_run_plan_takes_the_completed_prefix_that_fits(mods) -> None:
    pair = mods["fleet_pair"]
    arrivals = [0.5 * i for i in range(4)] + [2.0 + 0.05 * i for i in range(200)]
    assert pair.completed_prefix([{"status": "ok"}] * 3 + [{"status": "unfinished"}, {"status": "ok"}]) == 3
    assert pair.completed_prefix([{"status": "ok"}] * 2) == 2
    # One worker at 2 requests/s: n requests need about n/2 s; 30 s hold ~59 of the 120 completed.
    plan = pair.kill_run_plan(arrivals, 120, 30.0, 2.0, 20, 8, 16)
    assert 55 <= plan.requests <= 60 and plan.kill_s <= 30.0 and plan.kill_min_running == 16
    assert pair.kill_run_plan(arrivals, 40, 1e6, 2.0, 20, 8, 16).requests == 40
    # Never below the shortest useful prefix (the budget's cut-offs are then counted apart).
    assert pair.kill_run_plan(arrivals, 120, 1.0, 2.0, 20, 8, 16).requests == 20
    assert pair.kill_run_plan(arrivals, 12, 1.0, 2.0, 20, 8, 16).requests == 12


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


def test_runs_of_different_plans_are_a_note_not_the_end_of_the_benchmark(mods, tmp_path: Path) -> None:
    bench, _ = _bench(mods, tmp_path, "--kill-dtype", "float32")

    def run(name: str, adapter: str) -> dict:
        reqs = [{"adapter": adapter, "prompt_len": 8, "status": "ok", "token_ids": [1], "top_gaps": None}]
        return {"name": name, "requests": reqs, "samples": [], "kill": None}

    bench.result["runs"] = [run("packing-f32", "a"), run("packing-f32-kill", "b")]
    bench.compare_kill("packing-f32", "packing-f32-kill", [], judge="raw")
    assert "kill" not in bench.result
    assert bench.result["notes"][-1] == (
        "no token comparison of packing-f32-kill against packing-f32: the runs replayed different plans "
        "(prompts or adapters differ)"
    )
