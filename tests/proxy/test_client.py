"""The passthrough's HTTP/1.1 client against loopback servers that answer byte by byte as told.

Each server here is a raw asyncio server in the test's own event loop, so a test
decides exactly what goes over the wire: framing, closes, silences, garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest

from app.proxy.client import Pool, UpstreamError, UpstreamTimeout
from app.proxy.connection import HIGH_WATER
from tests.servers import free_port, pipe

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"


class Server:
    """Runs `handler(reader, writer, n)` for each connection (n counts from 0)."""

    def __init__(self, handler):
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()

    async def _serve(self, reader, writer):
        n, self.connections = self.connections, self.connections + 1
        try:
            await self.handler(self, reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    @contextlib.asynccontextmanager
    async def running(self):
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            yield self
        server.close()


def run(handler, scenario, **pool_options):
    """`scenario(pool, server)` against a server running `handler`, on a fresh event loop."""

    async def main():
        async with Server(handler).running() as server:
            pool = Pool(server.url + "/v1", connect_timeout=pool_options.pop("connect_timeout", 5),
                        read_timeout=pool_options.pop("read_timeout", 5), **pool_options)
            try:
                return await scenario(pool, server)
            finally:
                pool.close()

    return asyncio.run(main())


async def post(pool: Pool, server: Server, body: bytes = b'{"q":1}', headers=None):
    return await pool.post(server.url + "/v1/chat/completions?x=1",
                           headers or {"content-type": "application/json"}, body)


def answer_then_stall(sent: bytes, seconds: float = 5):
    """A handler that reads the request, sends `sent` (part of an answer, or nothing) and then
    says nothing for `seconds`."""

    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(sent)
        await asyncio.sleep(seconds)

    return handler


async def answer_ok_forever(server, reader, writer, n):
    while True:
        await server.read_request(reader)
        writer.write(OK)


def test_request_bytes_and_keep_alive():
    async def scenario(pool, server):
        for body in (b'{"q":1}', b'{"q":2}'):
            response = await post(pool, server, body, {"content-type": "application/json", "x-id": "7"})
            assert (response.status, response.header(b"content-type")) == (200, b"application/json")
            assert await response.read() == b'{"ok":true}'
            response.release()
        return server

    server = run(answer_ok_forever, scenario)
    assert server.connections == 1  # the second call reused the first connection
    port = server.url.rsplit(":", 1)[1]
    assert server.requests[1] == (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:" + port.encode() +
        b"\r\ncontent-type: application/json\r\nx-id: 7\r\ncontent-length: 7\r\n\r\n{\"q\":2}")


def test_chunked_stream_arrives_as_sent_and_de_chunked():
    events = [b"data: {\"n\":%d}\n\n" % i for i in range(5)]

    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in events:
            await server.next.wait()
            server.next.clear()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await reader.read()  # kept open until the client closes

    async def scenario(pool, server):
        server.next = asyncio.Event()
        response = await post(pool, server)
        got = []
        server.next.set()
        async for chunk in response.iter_chunks():
            got.append(chunk)  # each event alone: the next is sent only once this one arrived
            server.next.set()
        response.release()
        return got, len(pool._idle)

    got, idle = run(handler, scenario)
    assert got == events
    assert idle == 1  # read to its end: the connection serves again


def test_a_body_ended_by_the_close():
    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")

    async def scenario(pool, server):
        response = await post(pool, server)
        body = await response.read()
        response.release()
        return body, len(pool._idle)

    body, idle = run(handler, scenario)
    assert body == b"part one, part two"
    assert idle == 0


def test_a_body_cut_short_is_an_error():
    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")

    async def scenario(pool, server):
        response = await post(pool, server)
        with pytest.raises(UpstreamError, match="before the answer was complete"):
            await response.read()
        response.release()
        return len(pool._idle)

    assert run(handler, scenario) == 0


def test_a_kept_alive_connection_closed_while_idle_is_sent_again():
    async def handler(server, reader, writer, n):
        if n == 0:
            await server.read_request(reader)
            writer.write(OK)
            # The next request crosses the upstream's idle close: it is read, never answered.
            await server.read_request(reader)
            return
        await answer_ok_forever(server, reader, writer, n)

    async def scenario(pool, server):
        response = await post(pool, server)
        await response.read()
        response.release()
        response = await post(pool, server, b'{"q":2}')
        assert await response.read() == b'{"ok":true}'
        response.release()
        return server

    server = run(handler, scenario)
    assert server.connections == 2
    assert [request[-7:] for request in server.requests] == [b'{"q":1}', b'{"q":2}', b'{"q":2}']


def test_a_reused_connection_closed_late_is_not_sent_again():
    """Closed well after the request went out, the upstream may have begun the work: no resend."""

    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(OK)
        await server.read_request(reader)
        await asyncio.sleep(0.3)

    async def scenario(pool, server):
        response = await post(pool, server)
        await response.read()
        response.release()
        with pytest.raises(UpstreamError, match="closed the connection"):
            await post(pool, server, b'{"q":2}')
        return server

    server = run(handler, scenario, stale_within=0.1)
    assert (server.connections, len(server.requests)) == (1, 2)


def test_a_new_connection_closed_without_an_answer_is_not_sent_again():
    async def handler(server, reader, writer, n):
        await server.read_request(reader)  # then closes without a word

    async def scenario(pool, server):
        with pytest.raises(UpstreamError, match="closed the connection"):
            await post(pool, server)
        return server

    assert run(handler, scenario).connections == 1


def test_silence_before_the_head_times_out():
    async def scenario(pool, server):
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await post(pool, server)
        return asyncio.get_running_loop().time() - started

    assert 0.2 <= run(answer_then_stall(b""), scenario, read_timeout=0.2) < 2


def test_silence_mid_stream_times_out():
    handler = answer_then_stall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")

    async def scenario(pool, server):
        response = await post(pool, server)
        chunks = response.iter_chunks()
        assert await anext(chunks) == b"hello"
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await anext(chunks)
        assert asyncio.get_running_loop().time() - started < 2

    run(handler, scenario, read_timeout=0.3)


def test_nothing_listening():
    closed_url = f"http://127.0.0.1:{free_port()}"

    async def main():
        pool = Pool(closed_url, connect_timeout=2, read_timeout=2)
        with pytest.raises(UpstreamError, match="could not connect"):
            await pool.post(closed_url + "/v1/x", {}, b"{}")

    asyncio.run(main())


def test_connect_timeout(monkeypatch):
    async def main():
        pool = Pool("http://127.0.0.1:9/v1", connect_timeout=0.1, read_timeout=2)
        loop = asyncio.get_running_loop()

        async def never(*args, **kwargs):
            await asyncio.sleep(10)

        monkeypatch.setattr(loop, "create_connection", never)
        with pytest.raises(UpstreamTimeout, match="within 0.1 s"):
            await pool.post("http://127.0.0.1:9/v1/x", {}, b"{}")

    asyncio.run(main())


def test_reading_pauses_while_the_gateway_is_behind_and_that_silence_is_not_a_timeout():
    size = 4 * 2**20

    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()

    async def scenario(pool, server):
        response = await post(pool, server)
        conn = response._conn
        await asyncio.sleep(0.5)  # the server has sent all it can; we take nothing, past the read timeout
        buffered, paused = conn.buffered, conn.paused
        total = 0
        async for chunk in response.iter_chunks():
            total += len(chunk)
        response.release()
        return buffered, paused, total

    buffered, paused, total = run(handler, scenario, read_timeout=0.2)
    assert paused
    assert HIGH_WATER < buffered < 4 * HIGH_WATER  # not the whole 4 MiB
    assert total == size


def test_a_body_larger_than_the_buffer_is_read_whole():
    size = 3 * 2**20

    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + bytes(range(256)) * (size // 256))

    async def scenario(pool, server):
        response = await post(pool, server)
        await asyncio.sleep(0.2)  # so reading pauses before read() starts
        return await asyncio.wait_for(response.read(), 5)

    assert run(handler, scenario) == bytes(range(256)) * (size // 256)


def test_interim_answers_are_skipped():
    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK)

    async def scenario(pool, server):
        response = await post(pool, server)
        return response.status, response.raw_headers, await response.read()

    status, headers, body = run(handler, scenario)
    assert (status, body) == (200, b'{"ok":true}')
    assert (b"link", b"</a>") not in headers


def test_not_http_is_an_error():
    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    async def scenario(pool, server):
        with pytest.raises(UpstreamError, match="not valid HTTP"):
            await post(pool, server)

    run(handler, scenario)


def test_a_line_break_in_a_header_is_refused_before_anything_is_sent():
    async def scenario(pool, server):
        for headers in ({"x-a": "1\r\nx-b: 2"}, {"x-a": "1\nx-b: 2"}, {"x-a\r\nx-b": "2"}):
            with pytest.raises(ValueError, match="line break"):
                await post(pool, server, headers=headers)
        return server

    assert run(answer_ok_forever, scenario).connections == 0


def test_a_call_cancelled_mid_body_closes_its_connection():
    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await reader.read()  # until the client closes
        server.closed.set()

    async def scenario(pool, server):
        response = await post(pool, server)

        async def consume():
            try:
                async for _ in response.iter_chunks():
                    pass
            finally:
                response.close()

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.wait_for(server.closed.wait(), 2)
        return len(pool._idle)

    assert run(handler, scenario) == 0


def test_a_response_released_before_its_end_is_not_reused():
    handler = answer_then_stall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345", 1)

    async def scenario(pool, server):
        response = await post(pool, server)
        response.release()
        return len(pool._idle)

    assert run(handler, scenario) == 0


def test_an_idle_connection_past_its_keepalive_is_not_reused():
    async def scenario(pool, server):
        for _ in range(2):
            response = await post(pool, server)
            await response.read()
            response.release()
            await asyncio.sleep(0.15)
        return server

    assert run(answer_ok_forever, scenario, keepalive=0.1).connections == 2


def test_https_with_sni_against_a_trusted_certificate():
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    cert = authority.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)

    async def main():
        server = Server(answer_ok_forever)
        listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_context)
        port = listener.sockets[0].getsockname()[1]
        async with listener:
            trusted = Pool(f"https://localhost:{port}/v1", connect_timeout=5, read_timeout=5,
                           ssl_context=client_context)
            response = await trusted.post(f"https://localhost:{port}/v1/chat/completions", {}, b"{}")
            assert (response.status, await response.read()) == (200, b'{"ok":true}')
            response.release()
            trusted.close()
            # The system's trust store does not know this authority: refused, not sent.
            untrusted = Pool(f"https://localhost:{port}/v1", connect_timeout=5, read_timeout=5)
            with pytest.raises(UpstreamError, match="could not connect"):
                await untrusted.post(f"https://localhost:{port}/v1/chat/completions", {}, b"{}")
        assert len(server.requests) == 1
        assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost:%d\r\n" % port)

    asyncio.run(main())


def test_a_url_off_the_pools_origin_is_refused():
    pool = Pool("https://api.example.com/v1", connect_timeout=1, read_timeout=1)
    with pytest.raises(ValueError):
        asyncio.run(pool.post("https://other.example.com/v1/x", {}, b"{}"))
    with pytest.raises(ValueError):
        asyncio.run(pool.post("https://api.example.com.evil/v1/x", {}, b"{}"))
    assert pool.authority == "api.example.com"
    assert Pool("http://[::1]:8080", connect_timeout=1, read_timeout=1).authority == "[::1]:8080"


def test_bytes_on_an_idle_connection_retire_it():
    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        writer.write(OK)
        if n == 0:
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")  # unasked, while idle
        await answer_ok_forever(server, reader, writer, n)

    async def scenario(pool, server):
        for _ in range(2):
            response = await post(pool, server)
            assert (response.status, await response.read()) == (200, b'{"ok":true}')
            response.release()
            await asyncio.sleep(0.2)
        return server

    assert run(handler, scenario).connections == 2


def test_a_compressed_answer_is_decoded_and_an_unknown_coding_refused():
    import gzip
    import zlib

    events = b"".join(b"data: {\"n\":%d}\n\n" % i for i in range(50))
    answers = {0: ("gzip", gzip.compress(events)), 1: ("deflate", zlib.compress(events)),
               2: ("br", b"\x0b\x02\x80hello\x03"), 3: ("gzip", gzip.compress(events)[:-30])}

    async def handler(server, reader, writer, n):
        await server.read_request(reader)
        coding, body = answers[n]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: %s\r\ntransfer-encoding: chunked\r\n\r\n" % coding.encode())
        for start in range(0, len(body), 100):  # in pieces, as a stream comes
            piece = body[start:start + 100]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def scenario(pool, server):
        got = []
        for _ in range(2):
            response = await post(pool, server)
            got.append(b"".join([chunk async for chunk in response.iter_chunks()]))
            response.close()
        with pytest.raises(UpstreamError, match="content-encoding 'br'"):
            await post(pool, server)
        with pytest.raises(UpstreamError, match="compressed answer is broken"):  # at the head or on reading
            await (await post(pool, server)).read()
        return got

    assert run(handler, scenario) == [events, events]


def test_https_through_an_egress_proxys_tunnel():
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    connects: list[bytes] = []

    async def egress(reader, writer):
        """A CONNECT proxy: refuses what it doesn't know, else pipes bytes both ways."""
        head = await reader.readuntil(b"\r\n\r\n")
        connects.append(head)
        if b"proxy-authorization: Basic dTpwIHc=" not in head:  # u:p w
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            writer.close()
            return
        target_port = int(head.split(b" ")[1].rsplit(b":", 1)[1])
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def main():
        server = Server(answer_ok_forever)
        upstream = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_context)
        proxy = await asyncio.start_server(egress, "127.0.0.1", 0)
        port, proxy_port = upstream.sockets[0].getsockname()[1], proxy.sockets[0].getsockname()[1]
        base = f"https://localhost:{port}/v1"
        async with upstream, proxy:
            pool = Pool(base, connect_timeout=5, read_timeout=5, ssl_context=client_context,
                        proxy=f"http://u:p%20w@127.0.0.1:{proxy_port}")
            for _ in range(2):
                response = await pool.post(base + "/chat/completions", {}, b"{}")
                assert (response.status, await response.read()) == (200, b'{"ok":true}')
                response.release()
            pool.close()
            refused = Pool(base, connect_timeout=5, read_timeout=5, ssl_context=client_context,
                           proxy=f"http://127.0.0.1:{proxy_port}")
            with pytest.raises(UpstreamError, match="refused the tunnel .* 407"):
                await refused.post(base + "/chat/completions", {}, b"{}")
        return server, port

    server, port = asyncio.run(main())
    assert connects[0].startswith(b"CONNECT localhost:%d HTTP/1.1\r\nhost: localhost:%d\r\n" % (port, port))
    assert len(connects) == 2  # the two calls shared one tunnel; the refused pool asked once
    assert (server.connections, len(server.requests)) == (1, 2)
    with pytest.raises(ValueError, match="https upstreams only"):
        Pool("http://127.0.0.1:1/v1", connect_timeout=1, read_timeout=1, proxy="http://127.0.0.1:2")
