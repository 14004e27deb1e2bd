"""bench_fleet.py's replay cut off by its deadline mid-run (the first GPU float32 pair): requests in
flight then are "unfinished", never "ok", and the token comparison leaves them out on either side."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from lorafleet.bench.runner import RequestRecord, _one_request
from lorafleet.bench.workload import synthetic_workload
from lorafleet.client.grpc_client import AsyncClient

NAMES = ("fleet_server", "fleet_tokens", "fleet_run")


@pytest.fixture
def mods(bench_import):
    return {n: bench_import(n) for n in NAMES}


def test_a_cancelled_stream_is_not_a_completed_request() -> None:
    class SlowClient:
        async def stream(self, *args, **kwargs):
            from lorafleet.serving.api_types import GenerateChunk

            yield GenerateChunk("r", (7,), "a")
            await asyncio.sleep(60.0)  # the caller's deadline comes first
            yield GenerateChunk("r", (8,), "b")

    record = RequestRecord(adapter=None, prompt_len=2, sent_at=0.0)

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_one_request(SlowClient(), record, [1, 2], 4, 5.0), 0.2)

    asyncio.run(main())
    assert (record.status, record.token_ids) == ("cancelled", [7]) and record.done_at is not None


def test_a_replay_cut_off_mid_run_records_no_ok_without_its_tokens(mods, fake_server) -> None:
    """The GPU pair's reference: its deadline came 1.7 s into the replay, and the 11 requests then in
    flight were recorded "ok" with no tokens, then compared against the kill run's."""
    run = mods["fleet_run"]
    api, fleet, _ = fake_server
    fleet.max_running = 100
    fleet.token_delay_s = 0.02
    # 6 requests at once of 3 tokens (done in ~0.06 s), then 6 of 200 tokens (~4 s) and 6 more sent
    # after the deadline.
    short = synthetic_workload(
        popularity="identical", rate=1e4, duration_s=1, prompt_len=(4, 4), output_len=(3, 3), max_requests=6
    )
    long = synthetic_workload(
        popularity="identical",
        rate=1e4,
        duration_s=1,
        prompt_len=(4, 4),
        output_len=(200, 200),
        max_requests=6,
        seed=1,
    )
    plan = [*short, *(replace(p, at_s=0.3) for p in long), *(replace(p, at_s=30.0) for p in long)]
    args = run.bench_parser().parse_args(["--server", api.address, "--synthetic", "--aliases", "0"])
    spec = run.RunSpec(
        name="packing-f32",
        policy="packing",
        kill=False,
        serve_args=[],
        bench_args=[],
        max_batch_size=4,
        warmup_s=0.0,
        prewarm_s=0.0,
        tail_s=0.0,
        sample_every_s=0.1,
        serve_timeout_s=10.0,
    )
    record: dict = {"window_s": 1.0}

    async def main() -> None:
        async with AsyncClient(api.address) as client:
            deadline = time.monotonic() + 1.0
            await run._replay(spec, None, client, args, plan, record, (0.0, 1.0), deadline)

    asyncio.run(main())
    reqs = record["requests"]
    statuses = [r["status"] for r in reqs]
    assert record["error"].startswith("the run reached the benchmark's time budget")
    assert statuses == ["ok"] * 6 + ["unfinished"] * 6 + ["unsent"] * 6, statuses
    # Every "ok" has all its tokens; the cut-off ones keep what arrived, but no status that counts.
    assert all(len(r["token_ids"]) == 3 for r in reqs[:6])
    assert all(0 < len(r["token_ids"]) < 200 for r in reqs[6:12])
    assert record["bench"]["completed"] == 6 and record["bench"]["errors"] == {"unfinished": 6, "unsent": 6}
    # The completed requests' latencies, not those of the cut-off ones (which would be 0.02 s/token).
    assert record["bench"]["ttft_s"]["p50"] > 0 and record["bench"]["tpot_s"]["p99"] < 0.2

    # Against a full run of the same plan: only the requests completed in both are compared, the
    # rest counted apart (not lost, not "differ").
    full = [{**r, "status": "ok", "token_ids": [*r["token_ids"], 1]} for r in reqs]
    for r in full[:6]:
        r["token_ids"] = r["token_ids"][:-1]
    tok = mods["fleet_tokens"]
    out = tok.compare_runs({"name": "cut", "requests": reqs}, {"name": "full", "requests": full}, 0.05)
    assert (out["compared"], out["differ"], out["cut_off"], out["lost"]) == (6, 0, 12, 0)
    out = tok.compare_runs({"name": "full", "requests": full}, {"name": "cut", "requests": reqs}, 0.05)
    assert (out["compared"], out["differ"], out["cut_off"], out["lost"]) == (6, 0, 12, 0)


def test_a_prefix_of_a_plan_sends_its_requests_to_the_whole_plans_adapters(fake_server) -> None:
    """The adapter mapping goes by rank among the adapters a plan uses: the first pair replayed 86
    requests of the bf16 runs' plan with other adapters than those runs (adapter-24 for adapter-39),
    and a kill run replaying fewer requests than its reference could not be compared at all (the
    CPU smoke of a cut-off reference stopped with "the runs replayed different plans")."""
    from lorafleet.bench.runner import run_bench
    from lorafleet.bench.workload import PlannedRequest

    api, fleet, _ = fake_server
    fleet.max_running = 100
    whole = [PlannedRequest(0.0, i, 4, 2) for i in (5, 7, 3)]  # ranks 3, 5, 7 -> alice, bob, alice

    async def adapters(plan: list[PlannedRequest], of: list[PlannedRequest] | None) -> list[str | None]:
        records: list[RequestRecord] = []
        async with AsyncClient(api.address) as client:
            await run_bench(client, plan, allow_aliases=0, records_out=records, adapters_of=of)
        assert all(r.status == "ok" for r in records)
        return [r.adapter for r in records]

    assert asyncio.run(adapters(whole, None)) == ["bob", "alice", "alice"]
    assert asyncio.run(adapters(whole[:2], whole)) == ["bob", "alice"]
    assert asyncio.run(adapters(whole[:2], None)) == ["alice", "bob"]  # the prefix's own mapping
