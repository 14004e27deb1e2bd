"""benchmarks/fleet_stats.py: bootstrap intervals of latency percentiles and of their differences."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture
def stats(bench_import):
    return bench_import("fleet_stats")


def _run(name: str, ttft: np.ndarray, tpot: np.ndarray, sent: np.ndarray | None = None) -> dict:
    sent = np.arange(len(ttft), dtype=float) * 0.1 if sent is None else sent
    reqs = []
    for s, a, b in zip(sent, ttft, tpot):
        first = s + a
        reqs.append(
            {"sent": s, "first": first, "done": first + 10 * b + 1.0, "last": first + 10 * b,
             "tokens": 11, "status": "ok"}
        )  # fmt: skip
    return {"name": name, "requests": reqs, "burst": [10.0, 40.0]}


def test_interval_covers_the_percentile_and_narrows_with_more_requests(stats) -> None:
    rng = np.random.default_rng(0)
    small, large = rng.exponential(1.0, 200), rng.exponential(1.0, 5000)
    p, lo, hi = stats.interval(small, 50)
    assert lo <= p <= hi and p == pytest.approx(np.percentile(small, 50))
    _, lo2, hi2 = stats.interval(large, 50)
    assert lo2 <= np.log(2) <= hi2  # the exponential's median
    assert hi2 - lo2 < (hi - lo) / 2
    # Seeded: the same interval every time; NaN (no figure) is left out; one value gives none.
    assert stats.interval(small, 99) == stats.interval(small, 99)
    assert stats.interval(np.append(small, np.nan), 50) == stats.interval(small, 50)
    assert stats.interval(np.array([1.0, np.nan]), 50) is None


def test_paired_difference_tells_a_shift_from_noise(stats) -> None:
    rng = np.random.default_rng(1)
    base = rng.lognormal(0.0, 0.5, 700)
    shifted = base * 1.05  # 5% slower, request by request
    point, lo, hi = stats.difference(shifted, base, 99)
    assert point == pytest.approx(np.percentile(shifted, 99) - np.percentile(base, 99))
    assert 0 < lo <= point <= hi
    noisy = base * rng.normal(1.0, 0.01, 700)  # the same requests with 1% noise
    _, lo, hi = stats.difference(noisy, base, 50)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="same plan"):
        stats.difference(base, base[:10], 50)
    # A request missing from either run is left out of both.
    a, b = base.copy(), base.copy()
    a[0], b[1] = np.nan, np.nan
    assert stats.difference(a, b, 50)[0] == 0.0


def test_records_give_ttft_tpot_and_phases(stats) -> None:
    run = _run("packing", np.array([0.5, 0.2]), np.array([0.01, 0.02]))
    run["requests"].append({"sent": 2.0, "first": 2.1, "done": 2.1, "tokens": 1, "status": "ok"})
    run["requests"].append({"sent": 3.0, "first": None, "done": None, "tokens": 0, "status": "internal"})
    m = stats.per_request(run)
    assert m["ttft"][:3] == pytest.approx([0.5, 0.2, 0.1]) and np.isnan(m["ttft"][3])
    # TPOT ends at the last token ("last"), not at "done"; one token gives none.
    assert m["tpot"][:2] == pytest.approx([0.01, 0.02]) and np.isnan(m["tpot"][2:]).all()
    old = {**run["requests"][0]}
    del old["last"]
    assert stats.per_request({"requests": [old]})["tpot"][0] == pytest.approx(0.11)
    phases = stats.phase_of(np.array([0.0, 10.0, 39.9, 40.0, np.nan]), (10.0, 40.0))
    assert phases.tolist() == [0, 1, 1, 2, -1]


def test_markdown_tables(stats) -> None:
    rng = np.random.default_rng(2)
    n = 400
    sent = np.linspace(0.0, 60.0, n)
    ttft = rng.exponential(0.5, n)
    tpot = 0.014 + rng.exponential(0.002, n)
    runs = [
        _run("packing", ttft, tpot, sent),
        _run("least_loaded", ttft + 0.5, tpot, sent),
        {**_run("packing-kill", ttft, tpot, sent), "kill": {"at_s": 1.0}},
        {**_run("packing-f32", ttft[:50], tpot[:50], sent[:50]), "pair": True},
    ]
    md = stats.markdown(runs)
    table = md.split("paired over")[1]
    # least_loaded is 500 ms later on every request: packing minus it excludes 0; TPOT is the same.
    row = next(line for line in table.splitlines() if line.startswith("| least_loaded |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0].startswith("-500.0 [-500.0, -500.0] *")
    assert all(c.startswith("+0.0 [") and "*" not in c for c in cells[2:])
    assert "| packing-kill |" not in table.split("TPOT by the phase")[0]  # no kill run among the policies
    phase_rows = md.split("TPOT by the phase")[1].split("The kill pair")[0]
    counts = [int(c.split(",")[0]) for c in phase_rows.splitlines()[4].split("|")[2:-1]]
    assert counts == [
        int((sent < 10).sum()),
        int(((sent >= 10) & (sent < 40)).sum()),
        int((sent >= 40).sum()),
    ]
    assert "| packing-f32 |" in md.split("The kill pair")[1]
    assert stats.markdown([runs[3]]) == ""


def test_tail_table_and_the_cli(stats, tmp_path, capsys) -> None:
    rng = np.random.default_rng(3)
    n = 600
    ttft = rng.exponential(0.5, n)
    tpot = 0.014 + rng.exponential(0.002, n)
    # Slower only above the median: the tail table shows p75-p99 shifted; p50 tables would not.
    slow_tail = np.where(tpot > np.median(tpot), tpot + 0.003, tpot)
    runs = [_run("packing", ttft, slow_tail), _run("least_loaded", ttft, tpot)]
    row = stats.tail_table(runs[0], runs[1:]).splitlines()[2]
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert len(cells) == len(stats.TAIL_QUANTILES) and all(
        c.startswith("+3.0 [") and c.endswith("*") for c in cells
    )
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"runs": runs}))
    assert stats.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "TPOT across the tail" in out and "| least_loaded | +3.0 [" in out.split("TPOT across the tail")[1]
    assert stats.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read runs" in capsys.readouterr().err
