"""The demo's story check, timeline, report and plot on made-up runs (no Ray, no model): each part of
the story is judged from the samples, and a run that does not show it names the reason."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from lorafleet.bench.runner import RequestRecord, WorkerSample
from lorafleet.bench.workload import PlannedRequest
from lorafleet.cli import main
from lorafleet.demo.calibrate import Calibration
from lorafleet.demo.config import DemoConfig, add_arguments
from lorafleet.demo.plot import write_plot
from lorafleet.demo.report import format_story, format_timeline
from lorafleet.demo.story import (
    Machine,
    check_story,
    demo_phases,
    quiet_ttft_p50,
    summarize_phases,
    timeline,
)

CFG = DemoConfig(quiet_s=4.0, burst_s=4.0, cooldown_s=8.0, slice_s=1.0)
CAL = Calibration(2.0, 4, 400.0, 100.0, (380.0, 400.0, 420.0, 400.0), 1)
MACHINE = Machine(cores=2, load_avg_1m=3.5)
PHASES = demo_phases(CFG, CAL.requests_per_s)


def samples_from(
    busy: list[int], up: list[int], queue: list[int], migrations: list[int]
) -> list[WorkerSample]:
    """Ten samples a second, each second's values given per list (migrations cumulative)."""
    out = []
    released = 0
    for second, (b, u, q, m) in enumerate(zip(busy, up, queue, migrations)):
        if second and u < up[second - 1]:
            released += up[second - 1] - u
        out += [WorkerSample(second + k / 10, u, b, b, q, m, released) for k in range(10)]
    return out


GOOD = samples_from(
    busy=[1, 1, 1, 1, 2, 3, 3, 3, 3, 2, 1, 1, 1, 1, 1, 1],
    up=[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 1, 1, 1, 1, 1],
    queue=[0, 0, 0, 0, 0, 2, 4, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    migrations=[0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 3, 3, 3, 3, 3, 3],
)


def run(samples: list[WorkerSample], ttft_s: float = 0.05):
    plan = [PlannedRequest(t + 0.5, 0, 8, 16) for t in range(16)]
    records = []
    for p in plan:
        sent = 100.0 + p.at_s
        records.append(RequestRecord(None, 8, sent, sent + ttft_s, sent + ttft_s + 0.5, sent + 1.0, 16))
    summaries = summarize_phases(PHASES, plan, records, samples)
    ttft = quiet_ttft_p50(PHASES, plan, records)
    return summaries, check_story(CFG, CAL, summaries, samples, ttft, MACHINE)


def by_name(checks):
    return {c.name: c for c in checks}


def test_a_run_that_shows_the_story_passes_every_check() -> None:
    summaries, checks = run(GOOD)
    assert all(c.ok for c in checks), checks
    quiet, burst, cooldown = summaries
    assert (quiet.busy_max, burst.busy_max, burst.migrations + cooldown.migrations) == (1, 3, 3)
    assert cooldown.workers_released == 2 and quiet.requests == 4 and quiet.ttft_p50_s == pytest.approx(0.05)
    assert "the story showed" in format_story(checks)


def test_a_quiet_phase_on_two_workers_names_a_machine_slower_than_calibrated() -> None:
    busy = [2, 2, 1, 2, *[3] * 4, 3, 2, 1, 1, 1, 1, 1, 1]
    _, checks = run(samples_from(busy, [3] * 10 + [1] * 6, [0] * 16, [0] * 8 + [2] * 8))
    check = by_name(checks)["one worker while quiet"]
    assert not check.ok
    assert (
        "got slower after the calibration" in check.reason and "load average 3.5 on 2 cores" in check.reason
    )
    assert "NOT SHOWN" in format_story(checks) and "did NOT fully show" in format_story(checks)


def test_a_burst_that_stays_on_one_worker_says_the_calibration_overstated_it() -> None:
    _, checks = run(samples_from([1] * 16, [3] * 10 + [1] * 6, [0] * 16, [0] * 16))
    assert "overstated one worker" in by_name(checks)["more workers in the burst"].reason
    assert "no running sequence was moved" in by_name(checks)["migrations consolidate the load"].reason


def test_a_backlog_at_the_end_says_the_machine_is_too_slow_for_the_workers() -> None:
    busy = [1] * 4 + [3] * 12
    queue = [0] * 4 + [5] * 12
    _, checks = run(samples_from(busy, [3] * 16, queue, [0] * 8 + [1] * 8), ttft_s=3.0)
    end = by_name(checks)["release back to one"]
    assert not end.ok and "too slow for 3 workers" in end.reason
    assert not by_name(checks)["low TTFT while quiet"].ok


def test_idle_workers_left_up_at_the_end_name_the_idle_release() -> None:
    busy = [1] * 4 + [3] * 4 + [1] * 8
    _, checks = run(samples_from(busy, [3] * 16, [0] * 16, [0] * 8 + [1] * 8))
    end = by_name(checks)["release back to one"]
    assert not end.ok and "--idle-release-s" in end.reason


def test_timeline_slices_by_phase_and_places_the_migrations() -> None:
    slices = timeline(GOOD, PHASES, 1.0)
    assert [s.busy for s in slices] == [1, 1, 1, 1, 2, 3, 3, 3, 3, 2, 1, 1, 1, 1, 1, 1]
    assert [s.phase for s in slices[3:5]] == ["quiet", "burst"]
    assert [s.migrations for s in slices] == [0] * 8 + [1, 2] + [0] * 6
    text = format_timeline(slices, 1.0)
    rows = text.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["phase", "workers", "workers", "queue", "migrations"]
    assert all(r.count("|") == 2 for r in rows)  # two phase changes on each row


def test_config_flags_map_one_to_one_and_bad_values_are_clear_errors(capsys) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert DemoConfig.from_args(parser.parse_args([])) == DemoConfig()
    args = parser.parse_args(["--burst-load", "3", "--output-len", "10-20", "--no-progress", "--json"])
    cfg = DemoConfig.from_args(args)
    assert (cfg.burst_load, cfg.output_len, cfg.progress, cfg.json) == (3.0, (10, 20), False, True)
    for field in dataclasses.fields(DemoConfig):
        assert hasattr(args, field.name)
    for argv, needle in (
        (["--workers", "1"], "--workers"),
        (["--quiet-load", "1.5"], "--quiet-load"),
        (["--burst-load", "0.5"], "--burst-load"),
        (["--output-len", "9-3"], "--output-len"),
        (["--cooldown-s", "0"], "--cooldown-s"),
    ):
        assert main(["demo", *argv]) == 1  # refused before anything starts
        err = capsys.readouterr().err
        assert err.startswith("lorafleet: error:") and needle in err, err


def test_plot_and_json_of_a_run(tmp_path: Path) -> None:
    png = write_plot(tmp_path / "out" / "run.png", GOOD, PHASES, workers=3, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no worker samples"):
        write_plot(tmp_path / "empty.png", [], PHASES, workers=3, title="t")
    json.dumps(dataclasses.asdict(CAL))  # the calibration goes into the run's JSON as is
