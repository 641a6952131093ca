"""The passthrough's HTTP/1.1 client: one keep-alive connection pool per upstream, on httptools.

Why not aiohttp's client, which served this path before: its per-request
machinery (request and response objects, header multidicts, payload registry,
stream readers, timers) was about half of a passthrough's CPU. A raw ASGI
passthrough on aiohttp reached 0.36 of the direct rate on this machine, the same
passthrough on this client 0.69 (bench/proxy.py, wrk, non-streaming). The
parsing itself is not hand-written: responses go through httptools (llhttp,
the parser uvicorn and aiohttp use), which handles framing (content-length,
chunked, read-until-close). What is here is what a proxy needs and no more:

- POST a body, get the status and raw headers, then the body whole or as it
  arrives (de-chunked, so a stream's bytes are what the upstream sent);
- a connection goes back to the pool only after a complete response that allows
  keep-alive; anything else (a half-read body, an error, a cancelled call) closes it;
- a reused connection the upstream closed as the request went out is retried once
  on a new one, if not a byte of the answer came back (what browsers do) and the
  close came within a second;
- timeouts: to connect, and between two reads of the answer (not while the
  gateway itself is slow to take what was read: reading is paused then);
- TLS with the system's trust store, SNI and ALPN http/1.1, directly or through
  an egress proxy's CONNECT tunnel (app/proxy/egress.py);
- identity is asked for; an answer compressed anyway is decoded (gzip, deflate)
  so the meter can read it, and any other coding is an error.

Errors: `UpstreamError` (connect failed, broke off, not HTTP), and
`UpstreamTimeout` (a TimeoutError too).
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

from app.proxy.egress import EgressProxy

# Buffered and not yet taken by the gateway: above this, stop reading from the upstream.
HIGH_WATER = 256 * 1024
# An idle connection older than this is closed rather than reused: upstreams close idle
# connections after a while, and reusing one they are closing costs a retry.
KEEPALIVE = 30.0
# A reused connection closed this soon after the request went out, with no byte back, crossed
# the upstream's idle close: the request is sent again. Later, the upstream may have begun the
# work, and the call fails instead of risking it twice.
STALE_WITHIN = 1.0


class UpstreamError(Exception):
    """The upstream could not be reached, broke off, or did not answer in HTTP/1.1."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """No connection within the connect timeout, or silence longer than the read timeout."""


class _Stale(UpstreamError):
    """A reused connection was closed before any byte of the answer came: safe to send again."""


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time; fed by the event loop, read by a `Response`."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.used = False  # has answered before: a failure with no byte back may be a stale close
        self.in_use = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future | None = None
        self.paused = False
        self.last_read = self.sent_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self._framed = False  # content-length or chunked: the end of the body is in the bytes
        self.decoder = None  # for a compressed answer, though only identity was accepted
        self.received_body = False

    # The event loop's side.
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.in_use:
            self.close()  # bytes on an idle connection (a 408 before closing, say): not for a next call
            return
        self.received = True
        self.last_read = self.pool.loop.time()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamError(f"the upstream's answer is not valid HTTP/1.1: {exc}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.complete and not self._framed and self.error is None and exc is None:
            self.on_message_complete()  # a body delimited by the close
        elif not self.complete:
            if not self.received and self.used and self.pool.loop.time() - self.sent_at < STALE_WITHIN:
                self._fail(_Stale("the upstream closed a kept-alive connection"))
            else:
                self._fail(UpstreamError("the upstream closed the connection before the answer was complete"
                                         + (f": {exc}" if exc else "")))
        self._cancel_timer()

    # httptools' callbacks.
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            return
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                self._framed = True
            elif lowered == b"content-encoding" and value.strip().lower() != b"identity":
                # The gateway asks for identity, so the meter reads what the client gets. An
                # upstream that compresses anyway is decoded (gzip, deflate) or refused.
                if value.strip().lower() not in (b"gzip", b"x-gzip", b"deflate"):
                    self._fail(UpstreamError(f"the upstream answered in content-encoding {value.decode('latin-1')!r}"))
                    return
                self.decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip framing
        self.status = status
        self.head_done = True
        if status in (204, 304):
            self._framed = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.decoder is not None:
            body = self._decode(body)
            if not body:
                return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # the end of an interim answer
        if self.decoder is not None:
            tail = self._decode(None)
            if tail:
                self.chunks.append(tail)
            if self.error is not None:
                return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # asked later, llhttp has moved on
        self._cancel_timer()
        self._wake()

    def _decode(self, body: bytes | None) -> bytes:
        """Decompressed `body`, or the rest once the body has ended (None)."""
        try:
            if body is None:
                if self.received_body and not self.decoder.eof:
                    raise zlib.error("the compressed body ended early")
                return self.decoder.flush()
            self.received_body = True
            return self.decoder.decompress(body)
        except zlib.error as exc:
            self._fail(UpstreamError(f"the upstream's compressed answer is broken: {exc}"))
            return b""

    # The reader's side.
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        if not self.closed and self.transport is not None:
            self.transport.close()

    async def wait(self) -> None:
        """Until something new: the head, body bytes, the end, or an error (raised)."""
        if self.error is not None:
            raise self.error
        self.waiter = self.pool.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.paused and not self.closed:
            self.paused = False
            self.last_read = self.pool.loop.time()  # the silence while paused was the gateway's
            self.transport.resume_reading()
        return data

    def send(self, head: bytes, body: bytes, read_timeout: float | None) -> None:
        self.in_use = True
        self.last_read = self.sent_at = self.pool.loop.time()
        if read_timeout:
            self.timer = self.pool.loop.call_at(self.last_read + read_timeout, self._check_silence, read_timeout)
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)

    def _check_silence(self, read_timeout: float) -> None:
        self.timer = None
        if self.complete or self.closed:
            return
        now = self.pool.loop.time()
        # Paused, the silence is the gateway's; resuming restarts the count.
        due = now + read_timeout if self.paused else self.last_read + read_timeout
        if due > now:
            self.timer = self.pool.loop.call_at(due, self._check_silence, read_timeout)
            return
        self._fail(UpstreamTimeout(f"the upstream sent nothing for {read_timeout:g} s"))

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self._cancel_timer()
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


class Response:
    """An upstream's answer: `status`, `raw_headers`, then `read()` or `iter_chunks()`, then
    `release()` (the connection may serve again) or `close()`."""

    __slots__ = ("_conn", "status", "raw_headers")

    def __init__(self, conn: _Connection):
        self._conn = conn
        self.status = conn.status
        self.raw_headers = conn.headers

    def header(self, name: bytes) -> bytes | None:
        """The first header of that (lower-case) name."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value
        return None

    async def read(self) -> bytes:
        conn = self._conn
        parts = []
        while True:
            if conn.chunks:
                parts.append(conn.take())  # taking resumes reading, were it paused
            if conn.complete:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            await conn.wait()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: each piece is everything read since the last."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            else:
                await conn.wait()

    def release(self) -> None:
        """Back to the pool if the answer was read to its end and allows keep-alive; else closed."""
        conn = self._conn
        if conn.complete and not conn.closed and conn.error is None and conn.keep_alive:
            conn.pool._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        self._conn.close()


class Pool:
    """Keep-alive connections to one upstream origin (`base_url`'s scheme, host and port)."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float | None,
                 ssl_context: ssl.SSLContext | None = None, keepalive: float = KEEPALIVE,
                 proxy: str | None = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if https else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if self.port == (443 if https else 80) else f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.ssl = (ssl_context or _default_ssl()) if https else None
        self.proxy = EgressProxy(proxy, f"{host}:{self.port}") if proxy else None
        if self.proxy and not https:
            raise ValueError("an egress proxy is used for https upstreams only")
        self._idle: list[_Connection] = []  # the newest last
        self.loop: asyncio.AbstractEventLoop | None = None
        self._origin = f"{parts.scheme}://{parts.netloc}"

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> Response:
        """Send `body` to `url` (on this pool's origin) and wait for the answer's head."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        head = self._head(url, headers, len(body))
        conn = self._take_idle() or await self._connect()
        try:
            return await self._exchange(conn, head, body)
        except _Stale:
            # Not a byte came back on a reused connection: send it again on a new one. The
            # others idle as long may be closing too.
            self.close()
            return await self._exchange(await self._connect(), head, body)

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> Response:
        try:
            conn.send(head, body, self.read_timeout)
            while not conn.head_done:
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        conn.used = True
        return Response(conn)

    def _head(self, url: str, headers: dict[str, str], length: int) -> bytes:
        if not url.startswith(self._origin):
            raise ValueError(f"{url!r} is not on {self._origin}")
        target = url[len(self._origin):] or "/"
        if target[0] != "/":
            raise ValueError(f"{url!r} is not on {self._origin}")
        lines = [f"POST {target} HTTP/1.1", f"host: {self.authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"content-length: {length}\r\n\r\n")
        text = "\r\n".join(lines)
        # One line per header, whatever a value holds: a CR or LF would start a header of its own.
        if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
            raise ValueError("a header name or value holds a line break")
        return text.encode("latin-1")

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing() and \
                    self.loop.time() - conn.idle_since < self.keepalive:
                conn._reset()
                return conn
            conn.close()
        return None

    def _put(self, conn: _Connection) -> None:
        now = self.loop.time()
        conn.idle_since = now
        conn.in_use = False
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since >= self.keepalive):
            idle.pop(0).close()  # the oldest first
        idle.append(conn)

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.proxy is not None:
                    conn = _Connection(self)
                    conn.transport = await self.proxy.connect(self.loop, conn, self.ssl, self.host)
                    return conn
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            raise UpstreamTimeout(f"no connection to {self.authority} within {self.connect_timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"could not connect to {self.authority}: {exc}") from exc
        return conn

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


_ssl_context: ssl.SSLContext | None = None


def _default_ssl() -> ssl.SSLContext:
    """The system's trust store, made once per process (loading it costs milliseconds)."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
        _ssl_context.set_alpn_protocols(["http/1.1"])
    return _ssl_context

