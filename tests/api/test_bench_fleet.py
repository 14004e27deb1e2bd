"""benchmarks/bench_fleet.py's logic without a fleet: sizing, adapter folders, figures and rendering."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

import pytest


@pytest.fixture
def mods(bench_import):
    names = (
        "fleet_plan",
        "fleet_report",
        "fleet_assets",
        "fleet_settings",
        "fleet_tokens",
        "fleet_tables",
        "fleet_run",
        "fleet_delivery",
        "bench_fleet",
    )
    return {n: bench_import(n) for n in names}


def test_phase_sizing_fits_the_budget(mods) -> None:
    plan = mods["fleet_plan"]
    costs = plan.RunCosts(serve_start_s=30.0, warmup_s=6.0, tail_s=5.0, stop_s=10.0)
    per = plan.replay_seconds(500.0, runs_after=3, costs=costs, extra_s=40.0, reserve_s=10.0)
    # The current run (replay + tail + stop) and three more (start + warm-up + replay + tail + stop).
    spent = (per + 15.0) + 3 * (30.0 + 6.0 + per + 15.0) + 40.0 + 10.0
    assert spent == pytest.approx(500.0)
    # A last run replaying half the plan pays its fixed costs in full and half a replay.
    part = plan.replay_seconds(500.0, runs_after=2.5, costs=costs, extra_s=40.0, reserve_s=10.0)
    spent = (part + 15.0) + 2 * (30.0 + 6.0 + part + 15.0) + (30.0 + 6.0 + part / 2 + 15.0) + 50.0
    assert spent == pytest.approx(500.0) and part > per
    floors = (5.0, 15.0)
    assert plan.scale_phases((10.0, 30.0, 25.0), 150.0, floors) == (10.0, 30.0, 25.0)  # never stretched
    # Quiet phases give up their room above the floors first, in proportion ...
    assert plan.scale_phases((10.0, 30.0, 25.0), 57.5, floors) == pytest.approx((7.5, 30.0, 20.0))
    # ... then the burst, down to half ...
    assert plan.scale_phases((10.0, 30.0, 25.0), 38.0, floors) == pytest.approx((5.0, 18.0, 15.0))
    # ... then everything in proportion.
    assert plan.scale_phases((10.0, 30.0, 25.0), 17.5, floors) == pytest.approx((2.5, 7.5, 7.5))
    assert plan.scale_phases((10.0, 30.0, 25.0), -5.0, floors) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="three phase lengths"):
        plan.scale_phases((1.0, 0.0, 1.0), 10.0, floors)
    text = plan.shaped_phases(1.5, 8.0, (10.0, 20.0, 15.0))
    assert plan.burst_window(text) == (10.0, 30.0, 45.0)
    assert plan.capacity_rates(1000.0, 100.0, 0.3, 1.6) == pytest.approx((10.0, 3.0, 16.0))
    with pytest.raises(ValueError, match="quiet rate"):
        plan.shaped_phases(5.0, 2.0, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="three phases"):
        plan.burst_window("1:10,2:10")
    with pytest.raises(ValueError, match="> 0"):
        plan.capacity_rates(0.0, 100.0, 0.3, 1.6)


def test_adapter_names_share_weights_by_hard_link(mods, tmp_path: Path) -> None:
    assets = mods["fleet_assets"]
    root = tmp_path / "adapters"
    for i in range(2):
        (root / f"adapter-{i}").mkdir(parents=True)
        (root / f"adapter-{i}" / "adapter_config.json").write_text(json.dumps({"r": 16, "i": i}))
        (root / f"adapter-{i}" / "adapter_model.safetensors").write_bytes(bytes([i]) * 64)
    assets.link_adapters(root, total=5, distinct=2)
    assert sorted(p.name for p in root.iterdir()) == [f"adapter-{i}" for i in range(5)]
    weights = root / "adapter-3" / "adapter_model.safetensors"
    assert weights.read_bytes() == bytes([1]) * 64
    assert os.stat(weights).st_ino == os.stat(root / "adapter-1" / "adapter_model.safetensors").st_ino
    assert json.loads((root / "adapter-4" / "adapter_config.json").read_text())["i"] == 0
    assets.link_adapters(root, total=5, distinct=2)  # idempotent
    with pytest.raises(FileNotFoundError, match="adapter-5"):
        assets.link_adapters(root, total=8, distinct=6)
    with pytest.raises(ValueError, match="distinct"):
        assets.make_assets(tmp_path / "w", shape=None, num_adapters=2, distinct=3, log_path=tmp_path / "l")


def sample(t: float, alive: int, busy: int = 0, **counters: int) -> dict:
    base = dict.fromkeys(
        ("migrations", "workers_released", "worker_deaths", "resumed_after_fault", "requests_completed"), 0
    )
    return {
        "t": t,
        "alive": alive,
        "busy": busy,
        "running": [busy] * alive,
        "queue_len": 0,
        **base,
        **counters,
    }


def request(sent: float, done: float | None, tokens: list[int], status: str = "ok") -> dict:
    return {
        "adapter": "adapter-0",
        "prompt_len": 8,
        "sent": sent,
        "first": sent + 0.1,
        "done": done,
        "tokens": len(tokens),
        "status": status,
        "error": "",
        "token_ids": tokens,
    }


def fake_run(name: str, samples: list[dict], requests: list[dict], window_s: float = 20.0) -> dict:
    quant = {"p50": 0.1, "p90": 0.2, "p99": 0.3}
    ok = sum(r["status"] == "ok" for r in requests)
    return {
        "name": name,
        "policy": name.split("-")[0],
        "samples": samples,
        "requests": requests,
        "window_s": window_s,
        "burst": [5.0, 10.0],
        "bench_command": "lorafleet bench --phases 1:5,4:5,1:10",
        "bench": {
            "requests": len(requests),
            "completed": ok,
            "errors": {},
            "requests_per_s": 1.0,
            "ttft_s": quant,
            "tpot_s": quant,
            "clamped": 0,
        },
        "serve_started_s": 3.0,
    }


def test_gpu_seconds_release_and_counters(mods) -> None:
    rep = mods["fleet_report"]
    assert rep.step_integral([(1.0, 2.0), (3.0, 1.0)], 0.0, 5.0) == pytest.approx(2 * 3 + 1 * 2)
    assert rep.step_integral([(1.0, 2.0)], 4.0, 4.0) == 0.0
    samples = [
        sample(-0.5, 1),
        sample(4.0, 1, 1),
        sample(6.0, 2, 2, migrations=1),
        sample(13.0, 2, 1, migrations=3),
        sample(16.0, 1, 1, migrations=3, workers_released=1),
        sample(25.0, 1, 0, migrations=9),  # after the window: not counted
    ]
    requests = [request(1.0, 2.0, [1, 2]), request(6.0, 12.0, [3, 4, 5]), request(9.5, 14.0, [6])]
    run = fake_run("packing", samples, requests)
    assert rep.gpu_seconds(run) == pytest.approx(6 * 1 + 10 * 2 + 4 * 1)
    assert rep.gpu_seconds(run, "busy") == pytest.approx(4 * 0 + 2 * 1 + 7 * 2 + 3 * 1 + 4 * 1)
    assert rep.counter_delta(run, "migrations") == 3
    rel = rep.release_after_burst(run, burst_end=10.0)
    assert rel == {"peak_workers": 2.0, "after_burst_s": 6.0, "after_drain_s": 2.0}
    s = rep.summarize(run, burst_end=10.0, idle_release_s=3.0)
    assert s["release_met"] and s["release_target_s"] == 13.0 and s["peak_workers"] == 2
    assert s["tokens_per_gpu_s"] == pytest.approx(6 / 30)
    flat = fake_run("round_robin", [sample(0.0, 1)], requests)
    assert rep.release_after_burst(flat, 10.0)["after_burst_s"] is None
    stuck = fake_run("least_loaded", [sample(0.0, 2)], requests)
    assert not rep.summarize(stuck, 10.0, 3.0)["release_met"]


def test_token_comparison_raw_and_decisive(mods) -> None:
    tok = mods["fleet_tokens"]
    ref = fake_run("packing", [], [request(0, 1, [1, 2, 3]), request(1, 2, [4, 5]), request(2, 3, [6, 7])])
    # Request 0: decided everywhere (gaps 1.0); request 2: a near-tie at its second token.
    for r, gaps in zip(ref["requests"], ([1.0, 1.0, 1.0], [1.0, 1.0], [0.5, 0.02])):
        r["top_gaps"] = gaps
    other = fake_run(
        "packing-kill",
        [],
        [request(0, 1, [1, 9, 3]), request(1, None, [4], "internal"), request(2, 3, [6, 8])],
    )
    out = tok.compare_runs(ref, other, tolerance=0.05, sweep=(0.01, 0.6))
    assert (out["lost"], out["compared"], out["differ"], out["length_differs"]) == (1, 2, 2, 0)
    # Request 0 differs at a decided step; request 2 only at its near-tie, which is not compared.
    assert out["decisive"] == {"tolerance": 0.05, "differ": 1, "requests": [0], "tokens_compared": 4}
    assert [(s["tolerance"], s["differ"], s["tokens_compared"]) for s in out["sweep"]] == [
        (0.01, 2, 5),  # below every gap: everything is compared, both differ
        (0.6, 1, 3),  # request 2 is a near-tie from its first token: only request 0 is compared
    ]
    assert out["first_differences"][0] == {"request": 0, "position": 1, "tokens": 3, "reference_gap": 1.0}
    # A prefix of the plan (the kill run stops at the burst's end) compares its own requests.
    assert tok.compare_runs(ref, {**other, "requests": other["requests"][:1]}, 0.05)["compared"] == 1
    # Without gaps there is no decisive figure, only the raw one.
    bare = fake_run("x", [], [request(0, 1, [1, 2, 3])])
    assert tok.compare_runs(bare, bare, 0.05)["decisive"] is None
    with pytest.raises(ValueError, match="different plans"):
        tok.compare_runs(fake_run("x", [], []), ref, 0.05)
    with pytest.raises(ValueError, match="prompts or adapters"):
        tok.compare_runs(ref, fake_run("y", [], [request(0, 1, [1], "ok") | {"adapter": "other"}]), 0.05)
    assert tok.first_near_tie([0.3, 0.04, 0.01], 0.05) == 1 and tok.first_near_tie(None, 0.05) is None
    assert tok.top_gap(((3, -0.5), (9, -0.75))) == 0.25 and tok.top_gap(((3, -0.5),)) == float("inf")


def test_the_kill_picks_the_worker_holding_the_most_sequences(mods) -> None:
    run = mods["fleet_run"]
    server = importlib.import_module("fleet_server")

    def status(running: tuple[int, ...], pids: tuple[int, ...], states: tuple[str, ...] = ()):
        counters = dict.fromkeys(
            ("migrations", "workers_released", "worker_deaths", "resumed_after_fault", "requests_completed"),
            0,
        )
        return server.StatusSample(
            t=0.0,
            alive=len(running),
            active=len(running),
            busy=sum(1 for r in running if r),
            running=running,
            pids=pids,
            states=states or ("active",) * len(running),
            queue_len=0,
            requests_failed=0,
            tokens_generated=0,
            **counters,
        )

    assert run.choose_victim(status((3, 11), (100, 200)), 8) == (200, 11)
    assert run.choose_victim(status((3, 5), (100, 200)), 8) is None  # nobody holds enough yet
    assert run.choose_victim(status((12,), (100,)), 8) is None  # no second worker to resume on
    assert run.choose_victim(status((0, 9), (100, 0)), 8) is None  # the busy one has no pid yet
    # The other worker still starting cannot take the requests yet.
    assert run.choose_victim(status((12, 0), (100, 0), ("active", "starting")), 8) is None
    assert run.choose_victim(None, 1) is None


def test_delivery_gaps_and_summary(mods) -> None:
    dl = mods["fleet_delivery"]
    # Deltas at 1.0 s (1 token), 1.5 s (3 tokens: two arrive together with the first), 2.0 s (1).
    assert dl.gaps([(1.0, 1), (1.5, 3), (1.5, 0), (2.0, 1)]) == [0.5, 0.0, 0.0, 0.5]
    p = dl.percentiles([0.001, 0.002, 0.003])
    assert p["p50_ms"] == pytest.approx(2.0) and p["n"] == 3
    assert dl.percentiles([])["p50_ms"] is None
    fleet_side = {
        "itl": dl.percentiles([0.012] * 9),
        "delivery": dl.percentiles([0.001]),
        "shards": [[0], [1]],
    }
    engine_side = {"itl": dl.percentiles([0.0105] * 9), "tokens_per_s": 1.0}
    out = dl.summary(fleet_side, engine_side)
    assert out["added_p50_ms"] == pytest.approx(1.5) and out["met"]
    assert "added_p50_ms" not in dl.summary(fleet_side, None)
    reqs = dl.workload(4, 5, "x")
    assert [r.adapter for r in reqs] == [dl.ADAPTER, None, dl.ADAPTER, None]
    assert all(len(r.prompt_token_ids) == 8 and r.sampling.max_new_tokens == 5 for r in reqs)


def test_render_writes_tables_and_picture(mods, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    bf = mods["bench_fleet"]
    samples = [sample(0.0, 1), sample(6.0, 2, 2), sample(16.0, 1, 1)]
    reqs = [request(1.0, 2.0, [1, 2]), request(6.0, 12.0, [3, 4, 5])]
    runs = [fake_run("packing", samples, reqs), fake_run("least_loaded", [sample(0.0, 2, 1)], reqs)]
    kill_run = fake_run("packing-kill", samples, reqs)
    kill_run["kill"] = {
        "at_s": 7.0,
        "pid": 123,
        "victim_running": 4,
        "workers_at_kill": 2,
        "running_at_kill": 5,
    }
    runs.append(kill_run)
    for run in runs:
        for r in run["requests"]:
            r["top_gaps"] = [1.0] * len(r["token_ids"])
    tok, tables = mods["fleet_tokens"], mods["fleet_tables"]
    kill = {**tok.compare_runs(runs[0], kill_run, 0.05), **kill_run["kill"], "resumed_after_fault": 2}
    kill["noise_floor"] = [tok.compare_runs(runs[0], runs[1], 0.05)]
    dl = mods["fleet_delivery"]
    fleet_side = {
        "itl": dl.percentiles([0.011, 0.012]),
        "delivery": dl.percentiles([0.0008]),
        "tokens_per_s": 900.0,
        "shards": [[0, 2], [1, 3]],
    }
    delivery = dl.summary(fleet_side, {"itl": dl.percentiles([0.0105, 0.0115]), "tokens_per_s": 950.0})
    result = {
        "command": "python3 benchmarks/bench_fleet.py --smoke",
        "machine": {"host": "h", "cpus": 2, "gpus": [], "python": "3.12", "date_utc": "2026-11-30 10:00"},
        "load_average_start": [1.0, 2.0, 3.0],
        "load_average_end": [1.5, 2.0, 3.0],
        "profile": dict(vars(mods["fleet_settings"].PROFILES["smoke"])),
        "stages": {"assets": {"seconds": 1.0, "info": {"num_adapters": 100}}},
        "runs": runs,
        "kill": kill,
        "delivery": delivery,
        "sizing": {
            "warmup_tokens_per_s": 300.0,
            "warmup_spread": 0.1,
            "mean_output_tokens": 30.0,
            "one_worker_requests_per_s": 10.0,
            "rates_given": True,
            "rates": [4.0, 22.0],
            "plan_s_budget": 60.0,
            "phases": "4:5,22:30,4:25",
        },
        "migration": {
            "path": "runtime",
            "contexts": [
                {
                    "context_tokens_asked": 1024,
                    "context_tokens": 1024,
                    "export_ms_p50": 3.0,
                    "first_token_ms_p50": 40.0,
                    "at_head_ms_p50": 41.0,
                    "runs": [{"warmup": True}, {"warmup": False}],
                }
            ],
        },
        "notes": ["a note"],
    }
    (tmp_path / "fleet.json").write_text(json.dumps(result))
    bf.render(tmp_path)
    md = (tmp_path / "fleet.md").read_text()
    assert "| packing | 30.0 | 1.00x |" in md and "| least_loaded | 40.0 | 1.33x |" in md
    assert "packing vs least_loaded: least_loaded used 1.33x packing's GPU-seconds" in md
    assert "| 1,024 | 3.0 | 40.0 | 41.0 | 1 |" in md and "**met**" in md
    assert "- a note" in md and "rates given: quiet 4, burst 22 requests/s" in md
    assert "| worker pid 123, holding 4 sequences | 7.0 | 5 | 0 | 2 | 0 |" in md
    assert "| packing-kill (the kill run) | 2 | 0 | 0 of 2 (5 tokens compared) |" in md
    assert "| least_loaded (no kill: noise floor) | 2 | 0 | 0 of 2 (5 tokens compared) |" in md
    assert "killed worker (4 sequences on it): 0 lost, 0 of 2 differ before their first near-tie" in md
    assert "| 0.05 | 0 / 5 | 0 / 5 |" in md
    assert "| added by the fleet | +0.50 | +0.50 | | |" in md
    assert "adds under 2 ms p50 over the in-process engine: +0.50 ms" in md
    assert tables.sweep_table({"sweep": []}) == ""
    nobody = {**kill, "pid": None, "at_s": None, "victim_running": None}
    assert "| nobody: no moment with two active workers" in tables.kill_table(nobody)
    assert tables.kill_targets(nobody) == [
        "- killed worker: no worker was killed (see the kill table): **not shown**"
    ]
    assert (tmp_path / "fleet.png").stat().st_size > 10_000


def test_settings_refuse_bad_flags(mods, tmp_path: Path) -> None:
    bf = mods["fleet_settings"]
    trace = tmp_path / "t.csv"
    trace.write_text("x")
    base = ["--out", str(tmp_path), "--trace", str(trace), "--servegen", str(tmp_path)]
    prof, extra = bf.settings(bf.build_parser().parse_args([*base, "--smoke", "--phases-s", "2,4,6"]))
    assert prof.device == "cpu" and prof.phases_s == (2.0, 4.0, 6.0) and extra["policies"][0] == "packing"
    assert prof.rates is None  # the smoke sizes its rates from the warm-up
    gpu, _ = bf.settings(bf.build_parser().parse_args(base))
    assert gpu.device == "cuda" and gpu.shape == "llama2-7b" and gpu.dtype == "bfloat16"
    assert gpu.rates == (4.0, 22.0) and gpu.phases_s == (3.0, 27.0, 27.0)
    given, _ = bf.settings(bf.build_parser().parse_args([*base, "--rates", "3,18", "--decisive-gap", "0.1"]))
    assert given.rates == (3.0, 18.0) and given.decisive_gap == 0.1
    assert bf.settings(bf.build_parser().parse_args([*base, "--rates", "warmup"]))[0].rates is None
    assert gpu.pack_batch_target is None
    target, _ = bf.settings(bf.build_parser().parse_args([*base, "--pack-batch-target", "28"]))
    assert target.pack_batch_target == 28
    for flags, needle in [
        (["--policies", "least_loaded,packing"], "start with packing"),
        (["--phases-s", "1,2"], "3 numbers"),
        (["--rates", "1,x"], "comma-separated"),
        (["--rates", "5,2"], "QUIET < BURST"),
        (["--decisive-gap", "0"], "decisive-gap"),
        (["--kill-min-running", "0"], "kill-min-running"),
        (["--pack-batch-target", "33"], r"pack-batch-target must be in \[1, 32\]"),
        (["--servegen", str(tmp_path / "none")], "does not exist"),
    ]:
        with pytest.raises(ValueError, match=needle):
            bf.settings(bf.build_parser().parse_args([*base, *flags]))


def test_sim_check_replays_the_plan_in_the_simulator(mods) -> None:
    settings = mods["fleet_settings"]
    trace, servegen = settings.TRACES / "azure_llm_2023_conv.csv", settings.TRACES / "servegen_m_large"
    if not trace.exists() or not servegen.is_dir():
        pytest.skip("the shared traces are not on this machine")
    check = importlib.import_module("fleet_sim_check")
    base = ["--trace", str(trace), "--servegen", str(servegen), "--json"]
    assert check.main(["--rates", "x", *base]) == 2
    assert check.window_gpu_seconds([(0.0, 1), (2.0, 2), (5.0, 1)], 6.0) == pytest.approx(2 + 6 + 1)
    args = argparse.Namespace(
        rates=(1.0, 6.0),
        phases_s=(2.0, 6.0, 6.0),
        profile="h200-llama2-7b",
        batch=32,
        max_new_tokens=128,
        max_prompt_tokens=1024,
        idle_release_s=5.0,
        tail_s=5.0,
        trace=str(trace),
        servegen=str(servegen),
        seed=0,
        prefill_token_s=None,
        prefill_alone_s=None,
    )
    out = check.check(args)
    assert out["phases"] == "1:2,6:6,1:6" and out["requests"] > 0
    assert set(out["runs"]) == {"packing", "least_loaded", "round_robin", "one worker"}
    assert out["runs"]["one worker"]["peak_gpus"] == 1
    assert out["runs"]["one worker"]["gpu_seconds"] == pytest.approx(out["window_s"])
    # Dearer prefill: the lone worker finishes later.
    slow = check.check(argparse.Namespace(**{**vars(args), "prefill_token_s": 1e-3}))
    assert slow["runs"]["one worker"]["last_finish_s"] > out["runs"]["one worker"]["last_finish_s"]
