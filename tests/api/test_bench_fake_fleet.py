"""run_bench against the fake-fleet server: every request accounted for, aliases cleaned up."""

from __future__ import annotations

import asyncio
import io

from lorafleet.bench.progress import ProgressBar
from lorafleet.bench.runner import RequestRecord, _one_request, grpc_sender, run_bench
from lorafleet.bench.workload import synthetic_workload
from lorafleet.client.grpc_client import AsyncClient
from lorafleet.serving.api_types import GenerateChunk
from lorafleet.worker.types import FinishReason


def test_bench_registers_aliases_for_distinct_and_removes_them(fake_server) -> None:
    api, fleet, _ = fake_server
    fleet.max_running = 100
    before = dict(fleet.adapters)
    plan = synthetic_workload(
        popularity="distinct", rate=200, duration_s=1, prompt_len=(2, 6), output_len=(2, 5), max_requests=12
    )
    out = io.StringIO()

    async def main():
        async with AsyncClient(api.address) as client:
            return await run_bench(
                client, plan, progress=ProgressBar(len(plan), stream=out), sample_every_s=0.05
            )

    report = asyncio.run(main())
    assert report.requests == report.completed == 12
    assert report.adapters_used == 12  # 2 real adapters + 10 aliases
    assert report.generated_tokens == sum(p.max_new_tokens for p in plan)
    assert report.ttft_s["p50"] is not None and report.tpot_s["p99"] is not None
    assert report.workers_over_time and report.max_busy_workers <= 1
    assert fleet.adapters == before
    assert "12/12 requests" in out.getvalue()


def test_bench_counts_errors_by_status(fake_server) -> None:
    api, fleet, _ = fake_server
    fleet.max_running = 1  # everything beyond one in flight is RESOURCE_EXHAUSTED
    plan = synthetic_workload(
        popularity="identical", rate=500, duration_s=1, prompt_len=(2, 2), output_len=(20, 20), max_requests=6
    )

    async def main():
        async with AsyncClient(api.address) as client:
            return await run_bench(client, plan, use_base=True)

    report = asyncio.run(main())
    assert report.requests == 6
    assert report.completed + report.errors.get("resource_exhausted", 0) == 6
    assert report.errors.get("resource_exhausted", 0) >= 1
    assert report.first_errors and "full" in report.first_errors[0]


def test_only_streams_ending_in_stop_or_length_count_as_completed() -> None:
    class ScriptedClient:
        """Answers every stream with the same chunks."""

        def __init__(self, chunks: list[GenerateChunk]) -> None:
            self.chunks = chunks

        async def stream(self, *args, **kwargs):
            for chunk in self.chunks:
                yield chunk

    def status_of(chunks: list[GenerateChunk]) -> tuple[str, int]:
        record = RequestRecord(adapter=None, prompt_len=2, sent_at=0.0)
        asyncio.run(_one_request(ScriptedClient(chunks), record, [1, 2], 4, 5.0))
        return record.status, record.tokens

    tokens = GenerateChunk("r", (7, 8), "ab")
    assert status_of([tokens, GenerateChunk("r", (9,), "c", finish_reason=FinishReason.LENGTH)]) == ("ok", 3)
    assert status_of([tokens, GenerateChunk("r", (), "", finish_reason=FinishReason.ABORT)]) == ("aborted", 2)
    assert status_of([tokens]) == ("incomplete", 2)


def test_bench_over_http_accounts_for_every_request_and_error(fake_http_server) -> None:
    from lorafleet.bench.http_sender import base_url, http_sender
    from lorafleet.client.sse_client import SseClient

    api, fleet = fake_http_server["api"], fake_http_server["fleet"]
    plan = synthetic_workload(
        popularity="uniform", rate=200, duration_s=1, prompt_len=(2, 6), output_len=(2, 5), max_requests=8
    )

    async def main(max_running: int):
        fleet.max_running = max_running
        async with (
            AsyncClient(api.address) as client,
            SseClient(base_url(fake_http_server["base"] + "/v1")) as http,
        ):
            return await run_bench(client, plan, send=http_sender(http, "fake"))

    try:
        report = asyncio.run(main(100))
        assert report.requests == report.completed == 8
        assert report.generated_tokens == sum(p.max_new_tokens for p in plan)  # from the usage chunks
        assert report.ttft_s["p50"] > 0 and report.tpot_s["p50"] > 0
        assert report.client_cpu_s > 0
        crowded = asyncio.run(main(1))  # one in flight: the rest are 429 -> resource_exhausted
        assert crowded.completed + crowded.errors.get("resource_exhausted", 0) == 8
        assert crowded.errors.get("resource_exhausted", 0) >= 1 and "full" in crowded.first_errors[0]
    finally:
        fleet.max_running = 4


def test_bench_cli_says_when_the_http_api_is_unreachable(fake_server, capsys) -> None:
    import socket

    from lorafleet.cli import main

    api, _, _ = fake_server
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    args = ["bench", "--server", api.address, "--synthetic", "--max-requests", "1", "--no-progress"]
    assert main([*args, "--http", f"http://127.0.0.1:{closed}"]) == 1
    assert f"cannot reach the HTTP API at http://127.0.0.1:{closed}" in capsys.readouterr().err
    assert main([*args, "--http", "127.0.0.1:8000"]) == 1
    assert "--http must be a URL" in capsys.readouterr().err


def test_grpc_sender_adds_sampling_fields_and_shows_each_chunk() -> None:
    class RecordingClient:
        def __init__(self) -> None:
            self.sampling: dict | None = None

        async def stream(self, prompt, *, adapter, sampling, timeout):
            self.sampling = sampling
            top = ((7, -0.5), (3, -0.75))
            yield GenerateChunk("r", (7,), "a", (-0.5,), top_logprobs=(top,))
            yield GenerateChunk("r", (), "", finish_reason=FinishReason.LENGTH)

    client = RecordingClient()
    seen: list[tuple[RequestRecord, GenerateChunk]] = []
    send = grpc_sender(
        client,  # type: ignore[arg-type]
        sampling={"logprobs": True, "top_logprobs": 2, "temperature": 0.7},
        on_chunk=lambda rec, chunk: seen.append((rec, chunk)),
    )
    record = RequestRecord(adapter="a", prompt_len=2, sent_at=0.0)
    asyncio.run(send(record, [1, 2], 3, 5.0))
    # The extras are added; the bench's own greedy fields win over them.
    assert client.sampling == {
        "logprobs": True,
        "top_logprobs": 2,
        "temperature": 0.0,
        "max_new_tokens": 3,
        "ignore_eos": True,
    }
    assert [c.token_ids for r, c in seen] == [(7,), ()] and all(r is record for r, _ in seen)
    assert seen[0][1].top_logprobs == (((7, -0.5), (3, -0.75)),)
    assert (record.status, record.token_ids) == ("ok", [7])
