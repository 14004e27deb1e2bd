"""`lorafleet bench --phases / --trace-start-s / --servegen`: re-timed trace slices and tenant adapters."""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from pathlib import Path

import pytest

from lorafleet.bench import cli_flags
from lorafleet.bench import runner as bench
from lorafleet.bench.trace_phases import (
    Phase,
    assign_tenants,
    format_phases,
    parse_phases,
    phased_rows,
    slice_rows,
    tenant_weights,
)
from lorafleet.bench.workload import PlannedRequest, TraceRow, synthetic_workload
from lorafleet.client.grpc_client import AsyncClient

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"


def rows(n: int, gap: float = 1.0) -> list[TraceRow]:
    # Alternating short and long gaps, so a uniform stretch is told from a re-spacing.
    t, out = 0.0, []
    for i in range(n):
        out.append(TraceRow(t, 10 + i, 5 + i))
        t += gap if i % 2 == 0 else 3 * gap
    return out


def test_parse_phases_round_trip_and_errors() -> None:
    phases = parse_phases("0.5:10, 4:30,0.5:20")
    assert phases == [Phase(0.5, 10), Phase(4, 30), Phase(0.5, 20)]
    assert [p.requests for p in phases] == [5, 120, 10]
    assert parse_phases(format_phases(phases)) == phases
    for bad, needle in [
        ("4", "RATE:SECONDS"),
        ("a:1", "RATE:SECONDS"),
        ("1:nan", "RATE:SECONDS"),
        ("-1:5", "rate must be >= 0"),
        ("1:0", "seconds > 0"),
        ("0:5,0.01:10", "no request"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_phases(bad)


def test_phases_retime_consecutive_rows_keeping_their_gap_shape() -> None:
    src = rows(40)
    out = phased_rows(src, parse_phases("0.5:4,3:4,1:6"))
    assert len(out) == 2 + 12 + 6
    # Every request keeps its trace lengths, in trace order.
    assert [(r.context_tokens, r.generated_tokens) for r in out] == [
        (r.context_tokens, r.generated_tokens) for r in src[:20]
    ]
    phase = [[r.at_s for r in out if lo <= r.at_s < hi] for lo, hi in ((0, 4), (4, 8), (8, 14))]
    assert [len(p) for p in phase] == [2, 12, 6]
    assert phase[1][0] == pytest.approx(4.0) and phase[2][0] == pytest.approx(8.0)
    # Within the burst: the native 1:3 alternation of gaps survives the compression.
    gaps = [b - a for a, b in zip(phase[1], phase[1][1:])]
    assert gaps[1] == pytest.approx(3 * gaps[0]) and gaps[2] == pytest.approx(gaps[0])
    times = [r.at_s for r in out]
    assert times == sorted(times)


def test_phases_need_enough_rows_and_spread_equal_timestamps() -> None:
    with pytest.raises(ValueError, match="need 30 consecutive trace requests and the slice has 9"):
        phased_rows(rows(10), parse_phases("1:10,2:10"))
    same = [TraceRow(5.0, 1, 1)] * 5
    out = phased_rows(same, parse_phases("1:4"))
    assert [r.at_s for r in out] == pytest.approx([0, 1, 2, 3])


def test_slice_rows_starts_later_in_the_trace() -> None:
    src = rows(10)
    cut = slice_rows(src, 5.0)
    assert cut[0].at_s == 0.0 and cut[0].context_tokens == src[3].context_tokens
    assert len(cut) == 7
    with pytest.raises(ValueError, match="no request after 100 s"):
        slice_rows(src, 100.0)
    with pytest.raises(ValueError, match=">= 0"):
        slice_rows(src, -1.0)


def write_servegen(folder: Path) -> None:
    folder.mkdir()
    # window_start_s, rate, cv, dist, p1, p2: client 7 is busiest in the first hour, client 3 next.
    (folder / "chunk-7-trace.csv").write_text("0,4.0,1.0,Gamma,1.0,1.0\n600,4.0,1.0,Gamma,1.0,1.0\n")
    (folder / "chunk-3-trace.csv").write_text("0,1.0,1.0,Weibull,1.0,1.0\n600,1.0,1.0,Weibull,1.0,1.0\n")
    (folder / "chunk-5-trace.csv").write_text("0,0,0,,,\n7200,9.0,1.0,Gamma,1.0,1.0\n")


def test_tenant_weights_and_assignment(tmp_path: Path) -> None:
    write_servegen(tmp_path / "sg")
    names, weights = tenant_weights(tmp_path / "sg", 0.0, 3600.0)
    assert names == ["tenant-7", "tenant-3"] and weights == [8.0, 2.0]  # tenant-5 is idle then
    with pytest.raises(ValueError, match="does not exist"):
        tenant_weights(tmp_path / "nope", 0.0, 3600.0)
    with pytest.raises(ValueError, match="> 0 seconds"):
        tenant_weights(tmp_path / "sg", 0.0, 0.0)
    plan = [PlannedRequest(i * 0.1, 0, 4, 4) for i in range(4000)]
    assigned = assign_tenants(plan, weights, seed=3)
    counts = Counter(p.adapter_index for p in assigned)
    assert set(counts) == {0, 1} and 0.75 < counts[0] / len(plan) < 0.85
    assert [p.at_s for p in assigned] == [p.at_s for p in plan]
    assert assign_tenants(plan, weights, seed=3) == assigned
    assert assign_tenants(plan, weights, seed=4) != assigned
    with pytest.raises(ValueError, match="weights"):
        assign_tenants(plan, [0.0, 0.0], seed=0)


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_flags.add_arguments(parser)
    return parser.parse_args(list(argv))


def write_trace(path: Path, n: int) -> None:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [
        f"2023-11-16 18:{10 + i // 60:02d}:{i % 60:02d}.5000000,{100 + i},{20 + i % 7}" for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_bench_plan_with_phases_and_tenants(tmp_path: Path) -> None:
    write_servegen(tmp_path / "sg")
    write_trace(tmp_path / "t.csv", 200)
    args = bench_args(
        "--trace", str(tmp_path / "t.csv"), "--phases", "1:10,5:10,1:10", "--trace-start-s", "20",
        "--servegen", str(tmp_path / "sg"), "--servegen-span-s", "3600", "--max-new-tokens", "16",
    )  # fmt: skip
    plan, clamped = cli_flags.build_plan(args, 512)
    assert len(plan) == 70 and plan[-1].at_s < 30.0
    assert plan[0].prompt_len == 120  # the row 20 s into the trace comes first
    assert all(p.max_new_tokens <= 16 for p in plan) and clamped == 70
    assert {p.adapter_index for p in plan} <= {0, 1}
    per_phase = Counter(int(p.at_s // 10) for p in plan)
    assert per_phase == {0: 10, 1: 50, 2: 10}
    with pytest.raises(ValueError, match="drop --rate"):
        cli_flags.build_plan(
            bench_args("--trace", str(tmp_path / "t.csv"), "--phases", "1:10", "--rate", "2"), 512
        )
    with pytest.raises(ValueError, match="pass --trace"):
        cli_flags.build_plan(bench_args("--synthetic", "--phases", "1:10"), 512)


def test_bench_servegen_on_synthetic_load(tmp_path: Path) -> None:
    write_servegen(tmp_path / "sg")
    args = bench_args("--synthetic", "--rate", "50", "--duration", "4", "--servegen", str(tmp_path / "sg"))
    plan, _ = cli_flags.build_plan(args, 512)
    assert len(plan) > 100 and {p.adapter_index for p in plan} == {0, 1, 2}  # a day: tenant-5 too


@pytest.mark.skipif(not (TRACES / "servegen_m_large").is_dir(), reason="shared traces absent")
def test_real_servegen_day_has_over_100_tenants() -> None:
    names, weights = tenant_weights(TRACES / "servegen_m_large", 0.0, 86400.0)
    assert len(names) >= 100 and weights == sorted(weights, reverse=True)


def test_bench_records_keep_the_streamed_token_ids(fake_server) -> None:
    api, fleet, _ = fake_server
    fleet.max_running = 100
    plan = synthetic_workload(
        popularity="identical", rate=200, duration_s=1, prompt_len=(2, 6), output_len=(2, 5), max_requests=8
    )
    records: list[bench.RequestRecord] = []

    async def main():
        async with AsyncClient(api.address) as client:
            return await bench.run_bench(client, plan, records_out=records, use_base=True)

    report = asyncio.run(main())
    assert report.completed == 8
    assert all(len(r.token_ids) == r.tokens == p.max_new_tokens for r, p in zip(records, plan))
    assert len({tuple(r.token_ids) for r in records}) > 1


def test_bench_cli_refuses_bad_shaping_before_connecting(tmp_path: Path, capsys) -> None:
    from lorafleet.cli import main

    write_trace(tmp_path / "t.csv", 20)
    base = ["bench", "--trace", str(tmp_path / "t.csv"), "--server", "127.0.0.1:1", "--connect-timeout", "30"]
    for extra, needle in [
        (["--phases", "1:x"], "phase '1:x' must look like RATE:SECONDS"),
        (["--servegen", str(tmp_path / "none")], "ServeGen folder"),
    ]:
        assert main([*base, *extra]) == 1
        assert needle in capsys.readouterr().err
