"""sse_client.py: HTTP/1.1 framing and SSE parsing, against scripted servers that send exact bytes.

The parser is fed every byte sequence whole and split at every position, since a TCP read may end
anywhere; the end-to-end cases run a real asyncio server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Awaitable, Callable

import pytest

from lorafleet.bench.http_sender import http_sender
from lorafleet.bench.runner import RequestRecord
from lorafleet.client.sse_client import HttpClientError, Origin, SseClient, _ReplyParser


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
)


def parse(raw: bytes, splits: list[int] | None = None) -> tuple[object, list[bytes]]:
    """Feed `raw` to a parser in pieces cut at `splits`; returns (Reply or exception, events)."""

    async def main():
        events: list[bytes] = []
        future = asyncio.get_running_loop().create_future()
        parser = _ReplyParser(lambda data, _now: events.append(data), future)
        cuts = [0, *(splits or []), len(raw)]
        try:
            for a, b in itertools.pairwise(cuts):
                if a < b:
                    parser.feed(raw[a:b], 0.0)
        except HttpClientError as exc:
            return exc, events
        parser.eof(None)
        try:
            return await future, events
        except HttpClientError as exc:
            return exc, events

    return asyncio.run(main())


def every_split(raw: bytes) -> list[list[int]]:
    return [[]] + [[i] for i in range(1, len(raw))] + [list(range(1, len(raw)))]


def test_chunked_event_stream_parses_the_same_at_every_split() -> None:
    body = chunked(b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\ndata: [DO', b"NE]\n\n")
    raw = SSE_HEAD + body
    for splits in every_split(raw):
        reply, events = parse(raw, splits)
        assert events == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"], splits
        assert reply.status == 200 and reply.body == b""


def test_crlf_and_cr_lines_multiline_data_comments_and_other_fields() -> None:
    stream = (
        b": a comment\r\n\r\n"  # a block without data dispatches nothing
        b"event: message\r\nid: 7\r\ndata: first\r\ndata:second\r\n\r\n"
        b"data\r\r"  # a bare field name: empty data; CR line ends
        b"retry: 10\ndata: last\n\n"
        b"data: never ends"  # cut off at EOF: dropped
    )
    raw = SSE_HEAD + chunked(stream)
    for splits in every_split(raw):
        _, events = parse(raw, splits)
        assert events == [b"first\nsecond", b"", b"last"], splits


def test_content_length_and_eof_bodies_and_interim_replies() -> None:
    error = b'{"error": {"message": "queue full"}}'
    sized = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: %d\r\n\r\n%s" % (len(error), error)
    for splits in every_split(sized):
        reply, events = parse(sized, splits)
        assert (reply.status, reply.body, events) == (429, error, []), splits
    to_eof = b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it"
    reply, _ = parse(to_eof, [20, 30])
    assert (reply.status, reply.body) == (200, b"all of it")
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + SSE_HEAD + chunked(b"data: x\n\n")
    reply, events = parse(interim)
    assert reply.status == 200 and events == [b"x"]
    # A 200 that is not an event stream keeps its body (the bench reports it as an error).
    plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    reply, events = parse(plain)
    assert reply.body == b"{}" and events == []


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"SMTP ready\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nabc", "more body bytes"),
        (SSE_HEAD + b"zz\r\nab\r\n", "chunk size"),
        (SSE_HEAD + b"2\r\nabXY", "CRLF"),
        (SSE_HEAD + b"0\r\n\r\nextra", "after the end"),
        (SSE_HEAD + b"5\r\ndata:", "closed mid-reply"),  # cut short by EOF
        (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc", "closed mid-reply"),
        (b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * 20000, "head is over"),
    ],
)
def test_broken_replies_are_errors(raw: bytes, needle: str) -> None:
    reply, _ = parse(raw)
    assert isinstance(reply, HttpClientError) and needle in str(reply)


def test_origin_parsing_and_bad_urls() -> None:
    o = Origin.parse("http://127.0.0.1:8071/api/")
    assert (o.host, o.port, o.prefix, o.host_header) == ("127.0.0.1", 8071, "/api", "127.0.0.1:8071")
    assert Origin.parse("https://example.com").host_header == "example.com"
    assert Origin.parse("http://[::1]:9000").host_header == "[::1]:9000"
    for bad in ("ftp://x", "http://", "127.0.0.1:8000", "http://h:99999", "http://h/?q=1", "http://u:p@h"):
        with pytest.raises(ValueError):
            Origin.parse(bad)
    with pytest.raises(ValueError, match="line break"):
        SseClient("http://h", headers={"Authorization": "Bearer x\r\nX-Evil: 1"})


# ---------------------------------------------------------------------- over a socket


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    return head, await reader.readexactly(length)


async def serve(script: Script) -> tuple[asyncio.AbstractServer, str, list[int]]:
    """A server that runs `script(reader, writer, connection number)`; returns its URL too."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await script(reader, writer, connections[-1])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", connections


def sse_reply(*events: bytes) -> bytes:
    return SSE_HEAD + chunked(*events)


def test_keep_alive_reuses_one_connection_and_sends_the_request_as_given() -> None:
    seen: list[tuple[str, bytes]] = []

    async def script(reader, writer, _n):
        while True:
            head, body = await read_request(reader)
            seen.append((head, body))
            writer.write(sse_reply(b"data: %d\n\n" % len(seen), b"data: [DONE]\n\n"))
            await writer.drain()

    async def main():
        server, url, connections = await serve(script)
        async with SseClient(url + "/pre", headers={"Authorization": "Bearer t0k"}) as client:
            events: list[bytes] = []
            for _ in range(3):
                await client.stream(
                    "POST", "/v1/x", body=b'{"k": 1}', on_event=lambda d, _t: events.append(d), timeout=5
                )
            assert events == [b"1", b"[DONE]", b"2", b"[DONE]", b"3", b"[DONE]"]
        server.close()
        return connections

    assert asyncio.run(main()) == [0]
    head, body = seen[0]
    assert head.startswith("POST /pre/v1/x HTTP/1.1\r\n") and body == b'{"k": 1}'
    assert "Authorization: Bearer t0k\r\n" in head and "Content-Length: 8\r\n" in head
    assert "Accept: text/event-stream\r\n" in head and head.count("Host: 127.0.0.1:") == 1


def test_a_pooled_connection_the_server_closed_is_replaced_once() -> None:
    async def script(reader, writer, n):
        await read_request(reader)
        writer.write(sse_reply(b"data: conn %d\n\n" % n))
        await writer.drain()
        if n in (0, 2):
            await read_request(reader)  # the next request on this connection gets no reply: closed
        # connection 1 closes at once, while the client holds it idle in its pool

    async def main():
        server, url, connections = await serve(script)
        got: list[bytes] = []
        async with SseClient(url) as client:
            for pause in (0.0, 0.05, 0.0):
                await asyncio.sleep(pause)  # after connection 1: its close reaches the client
                await client.stream("POST", "/", on_event=lambda d, _t: got.append(d), timeout=5)
        server.close()
        return got, connections

    got, connections = asyncio.run(main())
    # 2nd request: conn 0 closed on it before replying, so it went again on conn 1; the 3rd found
    # conn 1 closed in the pool and opened conn 2.
    assert got == [b"conn 0", b"conn 1", b"conn 2"] and connections == [0, 1, 2]


def test_a_new_connection_closed_before_replying_is_an_error() -> None:
    async def script(reader, writer, _n):
        await read_request(reader)

    async def main():
        server, url, connections = await serve(script)
        async with SseClient(url) as client:
            with pytest.raises(HttpClientError, match="before replying"):
                await client.stream("POST", "/", on_event=lambda d, _t: None, timeout=5)
        server.close()
        return connections

    assert asyncio.run(main()) == [0]  # not retried: the server may have seen the request


def test_cut_streams_timeouts_refusals_and_handler_errors_surface() -> None:
    async def script(reader, writer, _n):
        head, _ = await read_request(reader)
        if "/cut" in head:
            writer.write(SSE_HEAD + b"9\r\ndata: x\n\n\r\n")
            await writer.drain()
            return  # closes mid-stream
        if "/slow" in head:
            await asyncio.sleep(5)
        writer.write(sse_reply(b"data: not json\n\n"))
        await writer.drain()
        await asyncio.sleep(5)

    async def main():
        server, url, _ = await serve(script)
        client = SseClient(url)
        got: list[bytes] = []
        with pytest.raises(HttpClientError, match="mid-reply"):
            await client.stream("POST", "/cut", on_event=lambda d, _t: got.append(d), timeout=5)
        assert got == [b"x"]
        with pytest.raises(asyncio.TimeoutError):
            await client.stream("POST", "/slow", on_event=lambda d, _t: None, timeout=0.2)
        with pytest.raises(json.JSONDecodeError):
            await client.stream("POST", "/bad", on_event=lambda d, _t: json.loads(d), timeout=5)
        assert not client._idle and not client._open  # failed connections are never reused
        await client.aclose()
        server.close()
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            closed = sock.getsockname()[1]
        with pytest.raises(OSError):
            await SseClient(f"http://127.0.0.1:{closed}").get("/health", timeout=5)

    asyncio.run(main())


def run_sender(events: list[bytes], status: bytes = b"200 OK") -> RequestRecord:
    """The bench's HTTP sender against a server that answers with exactly these events."""

    async def script(reader, writer, _n):
        await read_request(reader)
        if status.startswith(b"200"):
            writer.write(sse_reply(*events))
        else:
            body = b"".join(events)
            writer.write(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body))
        await writer.drain()

    async def main():
        server, url, _ = await serve(script)
        async with SseClient(url) as client:
            record = RequestRecord(adapter="a", prompt_len=2, sent_at=0.0)
            await http_sender(client, "base")(record, [1, 2], 3, 5.0)
        server.close()
        return record

    return asyncio.run(main())


def chunk(text: str, finish: str | None = None, usage: int | None = None) -> bytes:
    choices = [] if usage is not None else [{"index": 0, "text": text, "finish_reason": finish}]
    body = {"id": "c", "choices": choices, "usage": {"completion_tokens": usage} if usage else None}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def test_bench_sender_times_counts_and_judges_each_stream() -> None:
    ok = run_sender([chunk("a"), chunk("b"), chunk("c", "length"), chunk("", usage=3), DONE])
    assert (ok.status, ok.tokens) == ("ok", 3)
    assert ok.sent_at <= ok.first_token_at <= ok.last_token_at <= ok.done_at
    cases = [
        ([chunk("a"), chunk("", usage=1), DONE], "incomplete", "finish reason"),
        ([chunk("a", "abort"), chunk("", usage=1), DONE], "aborted", "aborted"),
        ([chunk("a", "stop"), DONE], "incomplete", "usage"),
        ([chunk("a", "stop"), chunk("", usage=1)], "incomplete", "[DONE]"),
        ([chunk("a"), b'data: {"error": {"message": "worker died"}}\n\n', DONE], "internal", "worker died"),
        ([chunk("a", "stop"), chunk("", usage=1), DONE, chunk("late")], "unavailable", "after data: [DONE]"),
        ([b'data: {"choices": "nope"}\n\n', DONE], "unavailable", "TypeError"),
        ([b"data: {oops\n\n"], "unavailable", "JSONDecodeError"),
    ]
    for events, status, needle in cases:
        record = run_sender(events)
        assert record.status == status and needle in record.error, (events, record)
    refused = run_sender([b'{"error": {"message": "the queue is full"}}'], b"429 Too Many Requests")
    assert (refused.status, refused.error) == ("resource_exhausted", "the queue is full")
    odd = run_sender([b"<html>teapot</html>"], b"418 I'm a teapot")
    assert (odd.status, odd.error) == ("http_418", "<html>teapot</html>")
