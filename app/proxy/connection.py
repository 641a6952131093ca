"""One HTTP/1.1 connection to an upstream, parsed by httptools: the protocol under app.proxy.client.

It sends one request at a time and feeds what the upstream answers to the `Response` that
reads it: the head, then the body de-chunked (and decoded, if the upstream compressed it
though identity was asked), pausing reading above HIGH_WATER unread, and timing the
upstream's silence between reads. Errors are `UpstreamError` (broke off, not HTTP) and
`UpstreamTimeout` (a TimeoutError too); `Stale` is a reused connection closed before any
byte came back, which the pool sends again.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import cast

import httptools

# Buffered and not yet taken by the gateway: above this, stop reading from the upstream.
HIGH_WATER = 256 * 1024
# A reused connection closed this soon after the request went out, with no byte back, crossed
# the upstream's idle close: the request is sent again. Later, the upstream may have begun the
# work, and the call fails instead of risking it twice.
STALE_WITHIN = 1.0


class UpstreamError(Exception):
    """The upstream could not be reached, broke off, or did not answer in HTTP/1.1."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """No connection within the connect timeout, or silence longer than the read timeout."""


class Stale(UpstreamError):
    """A reused connection was closed before any byte of the answer came: safe to send again."""


class Connection(asyncio.Protocol):
    """One connection, one exchange at a time; fed by the event loop, read by a `Response`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stale_within: float = STALE_WITHIN):
        self.loop = loop
        self.stale_within = stale_within
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.used = False  # has answered before: a failure with no byte back may be a stale close
        self.in_use = False
        self.reset()

    def reset(self) -> None:
        """Ready for the next exchange: a fresh parser and answer."""
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
        self.decoder: zlib._Decompress | None = None  # for a compressed answer, though only identity was asked
        self.received_body = False

    # The event loop's side.
    def _connected(self) -> asyncio.Transport:
        assert self.transport is not None, "not connected yet"
        return self.transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are Transports in all but their class: not a subclass of asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_use:
            self.close()  # bytes on an idle connection (a 408 before closing, say): not for a next call
            return
        self.received = True
        self.last_read = self.loop.time()
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
            if not self.received and self.used and self.loop.time() - self.sent_at < self.stale_within:
                self._fail(Stale("the upstream closed a kept-alive connection"))
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
            self._connected().pause_reading()
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
        decoder = self.decoder
        assert decoder is not None
        try:
            if body is None:
                if self.received_body and not decoder.eof:
                    raise zlib.error("the compressed body ended early")
                return decoder.flush()
            self.received_body = True
            return decoder.decompress(body)
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
        self.waiter = self.loop.create_future()
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
            self.last_read = self.loop.time()  # the silence while paused was the gateway's
            self._connected().resume_reading()
        return data

    def send(self, head: bytes, body: bytes, read_timeout: float | None) -> None:
        self.in_use = True
        self.last_read = self.sent_at = self.loop.time()
        if read_timeout:
            self.timer = self.loop.call_at(self.last_read + read_timeout, self._check_silence, read_timeout)
        transport = self._connected()
        transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            transport.write(body)

    def _check_silence(self, read_timeout: float) -> None:
        self.timer = None
        if self.complete or self.closed:
            return
        now = self.loop.time()
        # Paused, the silence is the gateway's; resuming restarts the count.
        due = now + read_timeout if self.paused else self.last_read + read_timeout
        if due > now:
            self.timer = self.loop.call_at(due, self._check_silence, read_timeout)
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
