"""A lean HTTP/1.1 client for one job: send a request and read its reply's server-sent events.

`lorafleet bench --http` runs on the same cores as the server it measures, so every microsecond the
client spends per streamed token slows the steps it is timing. httpx cost 45-60 us of client CPU
per token (its per-chunk read path: an anyio stream read, h11 events, a line iterator, one task
wake-up per chunk). Here a connection is an asyncio Protocol: each read is parsed where it arrives,
in `data_received` (HTTP chunked framing, then SSE events), and every event's data goes to a
callback with its arrival time. A token costs one callback and no task switch; the caller's
coroutine wakes once, when the reply ends.

Connections are kept alive and reused (one per concurrent request, as an HTTP/1.1 client must);
a pooled connection the server closed while idle is replaced once, before any reply byte arrived.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# (data of one event, its arrival time on time.monotonic()) for every SSE event with data.
EventHandler = Callable[[bytes, float], None]

MAX_HEAD_BYTES = 64 * 1024  # a reply head larger than this is not from an HTTP server we talk to
MAX_BODY_BYTES = 16 * 1024 * 1024  # non-SSE bodies are kept in memory (error bodies, /health)


class HttpClientError(Exception):
    """The server's reply broke HTTP/1.1 or ended early."""


class _StaleConnection(HttpClientError):
    """A reused connection closed before any byte of the reply: the request can be sent again."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes  # empty when the events went to the handler


@dataclass(frozen=True)
class Origin:
    """Where requests go: http(s)://HOST[:PORT][/PREFIX] (the prefix goes before every path)."""

    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected a URL like http://127.0.0.1:8000, got {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"the URL may not carry a query, fragment or credentials: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class _ReplyParser:
    """One reply, fed the bytes as they arrive: head, then the body (chunked, sized or to EOF)."""

    def __init__(self, on_event: EventHandler | None, future: asyncio.Future[Reply]) -> None:
        self.on_event = on_event
        self.future = future
        self.got_bytes = False
        self.reusable = False
        self._buf = b""  # unparsed framing bytes (head, chunk sizes)
        self._head_done = False
        self._status = 0
        self._headers: dict[str, str] = {}
        self._mode = ""  # "chunked", "length" or "eof"
        self._left = 0  # bytes left in this chunk ("chunked") or the body ("length")
        self._chunk_state = "size"  # "size", "data", "crlf", "trailer"
        self._events = False  # the body is an event stream for on_event
        self._sse = b""  # an event's bytes so far
        self._body: list[bytes] = []
        self._body_len = 0

    # ------------------------------------------------------------------ framing

    def feed(self, data: bytes, now: float) -> None:
        self.got_bytes = True
        if not self._head_done:
            self._buf += data
            if not self._parse_head():
                return
            data, self._buf = self._buf, b""
            if self.future.done():  # a reply without a body
                if data:
                    raise HttpClientError("bytes after a reply without a body")
                return
        if self._mode == "chunked":
            self._feed_chunked(data, now)
        elif self._mode == "length":
            if len(data) > self._left:
                raise HttpClientError("more body bytes than Content-Length")
            self._left -= len(data)
            self._body_bytes(data, now)
            if self._left == 0:
                self._finish()
        else:
            self._body_bytes(data, now)

    def _parse_head(self) -> bool:
        """True once the head of a final (non-1xx) reply is parsed; its rest stays in _buf."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise HttpClientError(f"the reply head is over {MAX_HEAD_BYTES} bytes")
                return False
            head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4 :]
            lines = head.split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise HttpClientError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
            status = int(code)
            if 100 <= status < 200:
                continue  # an interim reply (103 Early Hints, ...): the final one follows
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise HttpClientError(f"a malformed header line: {line[:100]!r}")
                headers[name.strip().lower()] = value.strip()
            self._start_body(version, status, headers)
            return True

    def _start_body(self, version: str, status: int, headers: dict[str, str]) -> None:
        self._status, self._headers, self._head_done = status, headers, True
        keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        self._events = (
            self.on_event is not None
            and status == 200
            and headers.get("content-type", "").startswith("text/event-stream")
        )
        if status in (204, 304):
            self.reusable = keep_alive
            self._finish()
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode, self.reusable = "chunked", keep_alive
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise HttpClientError(f"bad Content-Length {headers['content-length']!r}") from None
            self._mode, self.reusable = "length", keep_alive
            if self._left == 0:
                self._finish()
        else:
            self._mode = "eof"  # the body ends when the server closes the connection

    def _feed_chunked(self, data: bytes, now: float) -> None:
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        while pos < end:
            state = self._chunk_state
            if state == "data":
                take = min(self._left, end - pos)
                self._body_bytes(buf[pos : pos + take], now)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._chunk_state = "crlf"
            elif state == "crlf":
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise HttpClientError("a chunk does not end with CRLF")
                pos += 2
                self._chunk_state = "size"
            else:  # "size" or "trailer": one CRLF-terminated line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > 1024:
                        raise HttpClientError("a chunk-size or trailer line is over 1024 bytes")
                    break
                line, pos = buf[pos:eol], eol + 2
                if state == "trailer":
                    if not line:
                        if pos != end:
                            raise HttpClientError("bytes after the end of a chunked reply")
                        self._finish()
                        return
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HttpClientError(f"bad chunk size {line[:40]!r}") from None
                if size < 0:
                    raise HttpClientError(f"bad chunk size {line[:40]!r}")
                self._left = size
                self._chunk_state = "data" if size else "trailer"
        self._buf = buf[pos:]

    def eof(self, exc: BaseException | None) -> None:
        """The connection closed: the end of an EOF-framed body, otherwise a reply cut short."""
        if self.future.done():
            return
        if self._head_done and self._mode == "eof" and exc is None:
            self._finish()
        elif not self.got_bytes:
            self.future.set_exception(_StaleConnection("the server closed the connection before replying"))
        else:
            why = f": {exc}" if exc is not None else ""
            self.future.set_exception(HttpClientError(f"the connection closed mid-reply{why}"))

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(Reply(self._status, self._headers, b"".join(self._body)))

    # ------------------------------------------------------------------ body

    def _body_bytes(self, data: bytes, now: float) -> None:
        if not data:
            return
        if not self._events:
            self._body_len += len(data)
            if self._body_len > MAX_BODY_BYTES:
                raise HttpClientError(f"the reply body is over {MAX_BODY_BYTES} bytes")
            self._body.append(data)
            return
        buf = self._sse + data if self._sse else data
        held = b""
        if b"\r" in buf:
            # SSE lines may end in CRLF or CR: make them LF, keeping back a final CR whose LF may
            # arrive in the next read.
            if buf.endswith(b"\r"):
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._event(buf[start:end], now)
            start = end + 2
        self._sse = buf[start:] + held
        if len(self._sse) > MAX_BODY_BYTES:
            raise HttpClientError(f"an event is over {MAX_BODY_BYTES} bytes")

    def _event(self, block: bytes, now: float) -> None:
        assert self.on_event is not None
        if block.startswith(b"data: ") and b"\n" not in block:  # one data line: what servers send
            self.on_event(block[6:], now)
            return
        data = []
        for line in block.split(b"\n"):
            if line.startswith(b"data"):
                name, _, value = line.partition(b":")
                if name == b"data":
                    data.append(value[1:] if value.startswith(b" ") else value)
            # Comments (":...") and the event, id and retry fields carry nothing a caller reads.
        if data:
            self.on_event(b"\n".join(data), now)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser: _ReplyParser | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or parser.future.done():
            self.close()  # bytes nobody asked for: the connection's framing is lost
            return
        try:
            parser.feed(data, time.monotonic())
        except Exception as exc:  # a framing error or the handler's own: the reply fails with it
            if not parser.future.done():
                parser.future.set_exception(exc)
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost ends the reply

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.parser is not None:
            self.parser.eof(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class SseClient:
    """Requests to one origin over pooled HTTP/1.1 connections; SSE replies go to a callback.

    `stream(...)` sends one request and returns the Reply once it has ended; with a 200
    text/event-stream reply every event's data went to `on_event` as it arrived (the Reply's body
    is then empty), otherwise the body is in the Reply. `timeout` bounds the whole exchange
    (connect, send, reply), as a gRPC deadline does. Errors: OSError (connect, reset),
    TimeoutError, HttpClientError (a broken or cut reply), or whatever `on_event` raised.
    """

    def __init__(
        self, url: str, *, headers: Mapping[str, str] | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.origin = Origin.parse(url)
        self._ssl = ssl_context or (ssl.create_default_context() if self.origin.scheme == "https" else None)
        fixed = {"Host": self.origin.host_header, "User-Agent": "lorafleet-bench", **(headers or {})}
        for name, value in fixed.items():
            if any(c in f"{name}{value}" for c in "\r\n"):
                raise ValueError(f"header {name!r} may not contain a line break")
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def __aenter__(self) -> SseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    async def get(self, path: str, *, timeout: float) -> Reply:
        return await self.stream("GET", path, timeout=timeout)

    async def stream(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        content_type: str = "application/json",
        on_event: EventHandler | None = None,
        timeout: float,
    ) -> Reply:
        if not path.startswith("/"):
            raise ValueError(f"a path starts with '/', got {path!r}")
        head = f"{method} {self.origin.prefix}{path} HTTP/1.1\r\n{self._fixed}"
        if body or method not in ("GET", "HEAD"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        if on_event is not None:
            head += "Accept: text/event-stream\r\n"
        request = (head + "\r\n").encode("latin-1") + body
        return await asyncio.wait_for(self._exchange(request, on_event), timeout)

    async def _exchange(self, request: bytes, on_event: EventHandler | None) -> Reply:
        for _ in range(2):
            conn, reused = await self._acquire()
            parser = _ReplyParser(on_event, asyncio.get_running_loop().create_future())
            conn.parser = parser
            try:
                assert conn.transport is not None
                conn.transport.write(request)
                reply = await parser.future
            except _StaleConnection:
                self._discard(conn)
                if reused:
                    continue  # closed by the server while idle; the request never reached it
                raise
            except BaseException:  # cancelled, timed out or failed: the framing is unknown now
                self._discard(conn)
                raise
            conn.parser = None
            if parser.reusable and not conn.closed:
                self._idle.append(conn)
            else:
                self._discard(conn)
            return reply
        raise HttpClientError("the server closed two connections in a row before replying")

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
            self._open.discard(conn)
        loop = asyncio.get_running_loop()
        host = self.origin.host
        _, conn = await loop.create_connection(
            _Connection, host, self.origin.port, ssl=self._ssl, server_hostname=host if self._ssl else None
        )
        self._open.add(conn)
        return conn, False

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)
