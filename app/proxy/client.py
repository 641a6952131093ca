"""The passthrough's HTTP/1.1 client: one keep-alive connection pool per upstream, on httptools.

Why not aiohttp's client, which served this path before: its per-request machinery
(request and response objects, header multidicts, payload registry, stream readers,
timers) was about half of a passthrough's CPU (docs/performance.md has the figures).
The parsing itself is not hand-written: responses go through httptools (llhttp, the
parser uvicorn and aiohttp use), which handles framing (content-length, chunked,
read-until-close); app.proxy.connection is the protocol. What is here is what a proxy
needs and no more:

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
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from app.proxy.connection import STALE_WITHIN, Connection, Stale, UpstreamError, UpstreamTimeout
from app.proxy.egress import EgressProxy

__all__ = ["Pool", "Response", "UpstreamError", "UpstreamTimeout"]

# An idle connection older than this is closed rather than reused: upstreams close idle
# connections after a while, and reusing one they are closing costs a retry.
KEEPALIVE = 30.0
# Idle connections kept per upstream at most (the newest): those in use are bounded by the web
# process's connection cap, but a burst's worth kept idle for ever would hold descriptors for nothing.
MAX_IDLE = 256


class Response:
    """An upstream's answer: `status`, `raw_headers`, then `read()` or `iter_chunks()`, then
    `release()` (the connection may serve again) or `close()`."""

    __slots__ = ("_conn", "_pool", "status", "raw_headers")

    def __init__(self, conn: Connection, pool: Pool):
        self._conn = conn
        self._pool = pool
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
            self._pool.put_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        self._conn.close()


class Pool:
    """Keep-alive connections to one upstream origin (`base_url`'s scheme, host and port)."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float | None,
                 ssl_context: ssl.SSLContext | None = None, keepalive: float = KEEPALIVE,
                 proxy: str | None = None, stale_within: float = STALE_WITHIN):
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
        self.stale_within = stale_within  # a reused connection closed this soon with no byte back is resent
        self._idle: list[Connection] = []  # the newest last
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
        except Stale:
            # Not a byte came back on a reused connection: send it again on a new one. The
            # others idle as long may be closing too.
            self.close()
            return await self._exchange(await self._connect(), head, body)

    async def _exchange(self, conn: Connection, head: bytes, body: bytes) -> Response:
        try:
            conn.send(head, body, self.read_timeout)
            while not conn.head_done:
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        conn.used = True
        return Response(conn, self)

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

    def _running(self) -> asyncio.AbstractEventLoop:
        assert self.loop is not None, "the pool has not sent anything yet"
        return self.loop

    def _take_idle(self) -> Connection | None:
        idle, now = self._idle, self._running().time()
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing() and \
                    now - conn.idle_since < self.keepalive:
                conn.reset()
                return conn
            conn.close()
        return None

    def put_back(self, conn: Connection) -> None:
        """Keep a connection whose answer was read whole for the next call (Response.release)."""
        now = self._running().time()
        conn.idle_since = now
        conn.in_use = False
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since >= self.keepalive or len(idle) >= MAX_IDLE):
            idle.pop(0).close()  # the oldest first
        idle.append(conn)

    async def _connect(self) -> Connection:
        loop = self._running()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.proxy is not None:
                    assert self.ssl is not None  # an egress proxy serves https upstreams only
                    conn = Connection(loop, self.stale_within)
                    conn.transport = await self.proxy.connect(loop, conn, self.ssl, self.host)
                    return conn
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, self.stale_within), self.host, self.port, ssl=self.ssl,
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

