"""Server CPU per streamed token of the gRPC and the HTTP API layers, over a stand-in fleet.

`lorafleet serve`'s front end (`serve.start_api`: grpc.aio servicer, uvicorn + FastAPI, metrics)
runs in a child process over a fleet that does no model work: every --step-ms it hands one token
to each running request through an asyncio queue, as the real fleet runtime does once per decode
step. This process sends --streams concurrent streams of --tokens tokens through one API at a
time, the bench's own senders for each (runner.py's gRPC client, http_sender.py's HTTP client), and
reads the server's CPU seconds (every thread, from getrusage) before and after each round. So the
figure per token is the API layer alone: the part of the head's CPU that differs between the two
APIs. The client's CPU per token is printed too.

    python benchmarks/bench_api_layer.py                  # 64 streams x 256 tokens, 3 rounds per API
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

from lorafleet.bench.http_sender import http_sender
from lorafleet.bench.runner import RequestRecord, grpc_sender
from lorafleet.client.grpc_client import AsyncClient
from lorafleet.client.sse_client import SseClient
from lorafleet.scheduler.status import ClusterStatus, FleetCounters, WorkerStatus
from lorafleet.serving.api_types import ModelView
from lorafleet.worker.types import FinishReason, Request, TokenDelta

VOCAB = 32000
MODEL = ModelView(name="demo", vocab_size=VOCAB, max_context_tokens=4096)


class StepFleet:
    """One token per running request per step, delivered through a queue per request."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.running: dict[str, tuple[Request, asyncio.Queue[TokenDelta], list[int]]] = {}
        self._stepper: asyncio.Task[None] | None = None

    async def generate(self, request: Request) -> AsyncIterator[TokenDelta]:
        if self._stepper is None:
            self._stepper = asyncio.create_task(self._steps())
        stream: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self.running[request.request_id] = (request, stream, [0])
        try:
            while True:
                delta = await stream.get()
                yield delta
                if delta.finished:
                    return
        finally:
            self.running.pop(request.request_id, None)

    async def _steps(self) -> None:
        next_step = time.monotonic()
        while True:
            for rid, (request, stream, made) in list(self.running.items()):
                made[0] += 1
                last = made[0] >= request.sampling.max_new_tokens
                stream.put_nowait(
                    TokenDelta(
                        rid,
                        (made[0] % VOCAB,),
                        new_text=f" t{made[0]}",
                        finish_reason=FinishReason.LENGTH if last else None,
                        num_prompt_tokens=len(request.prompt_token_ids),
                    )
                )
                if last:
                    del self.running[rid]
            next_step += self.step_s
            await asyncio.sleep(max(next_step - time.monotonic(), 0.0))

    async def abort(self, request_id: str) -> None:
        self.running.pop(request_id, None)

    def register_adapter(self, name: str, path: str) -> None:
        raise ValueError("this stand-in fleet takes no adapters")

    def unregister_adapter(self, name: str) -> None:
        raise KeyError(name)

    def list_adapters(self) -> dict[str, str]:
        return {}

    def status(self) -> ClusterStatus:  # for the server's metrics poll
        worker = WorkerStatus("w0", "active", len(self.running), 64, 1024, 1024, ())
        return ClusterStatus(workers=(worker,), queue_len=0, counters=FleetCounters())


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_main(conn: Connection, step_s: float) -> None:
    from lorafleet.serving.http_api import HttpState
    from lorafleet.serving.serve import start_api

    async def main() -> None:
        fleet = StepFleet(step_s)
        state = HttpState(fleet=fleet, model=MODEL, model_root="/models/demo", codec=None, chat_template=None)
        api = await start_api(
            fleet, model=MODEL, encode=lambda _t: [1], port=0, http_port=0, http=state, metrics_port=None
        )
        conn.send((api.address, f"http://127.0.0.1:{api.http_port}"))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def answer() -> None:  # a thread, so that the loop never waits on the pipe
            while conn.recv() == "cpu":
                conn.send(cpu_s())
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=answer, daemon=True).start()
        await stop.wait()
        await api.stop(grace_s=0.5)

    asyncio.run(main())


async def one_round(api: str, grpc_address: str, http_url: str, streams: int, tokens: int) -> int:
    records = [RequestRecord(None, 16, 0.0) for _ in range(streams)]
    async with AsyncClient(grpc_address) as client, SseClient(http_url) as http:
        send = grpc_sender(client) if api == "grpc" else http_sender(http, MODEL.name)
        await asyncio.gather(*(send(r, list(range(1, 17)), tokens, 300.0) for r in records))
    bad = [r for r in records if r.status != "ok" or r.tokens != tokens]
    if bad:
        raise RuntimeError(f"{len(bad)} {api} streams failed: {bad[0]}")
    return sum(r.tokens for r in records)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=20.0, help="time between two tokens of a stream")
    p.add_argument("--rounds", type=int, default=3, help="rounds per API, alternating")
    args = p.parse_args()
    if min(args.streams, args.tokens, args.rounds) < 1 or args.step_ms < 0:
        p.error("--streams, --tokens and --rounds must be at least 1, --step-ms at least 0")
    spawn = multiprocessing.get_context("spawn")  # no forked copy of grpc's state
    ours, theirs = spawn.Pipe()
    server = spawn.Process(target=server_main, args=(theirs, args.step_ms / 1000), daemon=True)
    server.start()
    grpc_address, http_url = ours.recv()
    results: dict[str, list[tuple[float, float]]] = {"grpc": [], "http": []}
    asyncio.run(one_round("grpc", grpc_address, http_url, 4, 8))  # warm both paths up
    asyncio.run(one_round("http", grpc_address, http_url, 4, 8))
    for i in range(args.rounds):
        for api in ("grpc", "http") if i % 2 == 0 else ("http", "grpc"):
            ours.send("cpu")
            server_before, client_before = ours.recv(), cpu_s()
            tokens = asyncio.run(one_round(api, grpc_address, http_url, args.streams, args.tokens))
            ours.send("cpu")
            server_cpu, client_cpu = ours.recv() - server_before, cpu_s() - client_before
            results[api].append((1e6 * server_cpu / tokens, 1e6 * client_cpu / tokens))
    ours.send("stop")
    server.join(30)
    load = os.getloadavg()[0]
    print(f"{args.streams} streams x {args.tokens} tokens, step {args.step_ms:g} ms, load average {load:.1f}")
    for api, rows in results.items():
        server_us = [s for s, _ in rows]
        client_us = [c for _, c in rows]
        server_runs = ", ".join(f"{s:.1f}" for s in server_us)
        client_runs = ", ".join(f"{c:.1f}" for c in client_us)
        print(
            f"{api:4}: server {statistics.median(server_us):6.1f} us/token (runs: {server_runs}), "
            f"client {statistics.median(client_us):6.1f} us/token (runs: {client_runs})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
