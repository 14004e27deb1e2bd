"""CPU per streamed token of `lorafleet bench --http`'s client, against a replay server.

A server process streams --streams completions of --tokens chunks each, shaped like
`/v1/completions` SSE chunks from lorafleet serve (one chunk per token, then the usage chunk and
`data: [DONE]`), one chunk to every stream each --step-ms, like a decode step of a full batch. The
client is the bench's own HTTP sender (http_sender.py: sse_client.py, JSON per chunk, the record's
times); this prints its CPU seconds per token (process time over the run, every thread). `--httpx`
runs the same reading loop over httpx instead, as the bench did before sse_client.py, for a
comparison on the same machine.

    python benchmarks/bench_sse_client.py                    # 64 streams x 256 tokens
    python benchmarks/bench_sse_client.py --httpx            # the same through httpx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from multiprocessing.connection import Connection

from lorafleet.bench.http_sender import http_sender
from lorafleet.bench.runner import RequestRecord
from lorafleet.client.sse_client import SseClient


def _chunk(i: int, text: str, finish: str | None) -> bytes:
    body = {
        "id": f"cmpl-{i:032x}",
        "object": "text_completion",
        "created": 1764489600,
        "model": "adapter-3",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }
    event = b"data: " + json.dumps(body).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _tail(i: int, tokens: int) -> bytes:
    usage = {"prompt_tokens": 16, "completion_tokens": tokens, "total_tokens": 16 + tokens}
    body = {"id": f"cmpl-{i:032x}", "object": "text_completion", "created": 1764489600}
    event = b"data: " + json.dumps({**body, "model": "adapter-3", "choices": [], "usage": usage}).encode()
    event += b"\n\n"
    done = b"data: [DONE]\n\n"
    return b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(event), event, len(done), done)


HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
)


def replay_server(port_out: Connection, streams: int, tokens: int, step_s: float) -> None:
    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []
        all_in = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:  # requests on a kept-alive connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    (
                        int(ln.split(b":")[1])
                        for ln in head.split(b"\r\n")
                        if ln.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                writer.write(HEAD)
                writers.append(writer)
                if len(writers) == streams:
                    all_in.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_out.send(server.sockets[0].getsockname()[1])
        await all_in.wait()
        chunks = [
            [_chunk(i, f" t{t}", "length" if t == tokens - 1 else None) for t in range(tokens)]
            for i in range(streams)
        ]
        next_step = time.monotonic()
        for t in range(tokens):
            for i, w in enumerate(writers):
                w.write(chunks[i][t])
            next_step += step_s
            await asyncio.sleep(max(next_step - time.monotonic(), 0))
        for i, w in enumerate(writers):
            w.write(_tail(i, tokens))
            await w.drain()
        await asyncio.sleep(1.0)
        server.close()

    asyncio.run(main())


async def run_lean(url: str, streams: int) -> list[RequestRecord]:
    records = [RequestRecord("adapter-3", 16, 0.0) for _ in range(streams)]
    async with SseClient(url) as client:
        send = http_sender(client, "demo")
        await asyncio.gather(*(send(r, [1] * 16, 256, 300.0) for r in records))
    return records


async def run_httpx(url: str, streams: int) -> list[RequestRecord]:
    """The bench's HTTP loop before sse_client.py: httpx, aiter_lines, json per chunk."""
    import httpx

    records = [RequestRecord("adapter-3", 16, 0.0) for _ in range(streams)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async def one(http: httpx.AsyncClient, record: RequestRecord) -> None:
        body = {"model": "adapter-3", "prompt": [1] * 16, "max_tokens": 256, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body, timeout=300.0) as reply:
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.monotonic()
                if chunk["choices"]:
                    if record.first_token_at is None:
                        record.first_token_at = now
                    record.last_token_at = now
                if chunk.get("usage"):
                    record.tokens = chunk["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, limits=limits) as http:
        await asyncio.gather(*(one(http, r) for r in records))
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=10.0, help="time between two chunks of a stream")
    p.add_argument("--httpx", action="store_true", help="read through httpx (the bench's old client)")
    args = p.parse_args()
    if args.streams < 1 or args.tokens < 1 or args.step_ms < 0:
        p.error("--streams and --tokens must be at least 1, --step-ms at least 0")
    spawn = multiprocessing.get_context("spawn")  # no forked copy of grpc's state
    receive, send = spawn.Pipe(duplex=False)
    server = spawn.Process(
        target=replay_server, args=(send, args.streams, args.tokens, args.step_ms / 1000), daemon=True
    )
    server.start()
    url = f"http://127.0.0.1:{receive.recv()}"
    run = run_httpx if args.httpx else run_lean
    cpu, wall = time.process_time(), time.monotonic()
    records = asyncio.run(run(url, args.streams))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    server.join(10)
    tokens = sum(r.tokens for r in records)
    bad = [r for r in records if r.status != "ok" or r.tokens != args.tokens]
    if bad:
        print(f"{len(bad)} streams failed: {bad[0]}", file=sys.stderr)
        return 1
    load = os.getloadavg()[0]
    print(
        f"{'httpx' if args.httpx else 'sse_client'}: {tokens} tokens in {wall:.1f} s, client "
        f"{cpu:.2f} CPU-s = {1e6 * cpu / tokens:.1f} us/token (load average {load:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
