"""When the database is away, every route answers 503 with Retry-After in its own shape, logged once;
and an unexpected 500 never costs the client its kept-alive connection."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import time

import httpx
import pytest

from tests.servers import ThreadedServer, pipe


class Relay:
    """A loopback TCP relay to PostgreSQL that the test cuts (closing every connection through it,
    refusing new ones) and restores."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.up = True
        self.writers: list[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _relay(self, reader, writer) -> None:
        if not self.up:
            writer.close()
            return
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, server_writer]
        await asyncio.gather(pipe(reader, server_writer), pipe(server_reader, writer))

    def cut(self) -> None:
        def close_all():
            self.up = False
            for writer in self.writers:
                writer.transport.abort()
            self.writers.clear()

        self.loop.call_soon_threadsafe(close_all)
        time.sleep(0.2)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(setattr, self, "up", True)

    def __enter__(self) -> Relay:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.mark.skipif(not os.environ.get("MEDIAGATE_TEST_DATABASE_URL"), reason="a PostgreSQL server to cut off")
def test_every_route_answers_503_in_its_shape_while_postgresql_is_away(settings, engine, make_account, caplog):
    from app.http.app import create_app

    account = make_account()
    with Relay(engine.url.host, engine.url.port or 5432) as relay:
        url = engine.url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
        app = create_app(dataclasses.replace(settings, database_url=url))
        with ThreadedServer(app, log_level="critical") as server, httpx.Client(base_url=server.url,
                                                                               timeout=30) as client:
            assert client.get("/v1/balance", headers=account.headers).status_code == 200
            relay.cut()
            time.sleep(1)  # past the key cache (0.5 s in the tests): the key must be looked up again
            caplog.set_level(logging.ERROR, logger="app.core.db")
            key = {"Authorization": f"Bearer {account.key}"}
            calls = [
                ("GET", "/v1/balance", {}, None, "openai"),
                ("GET", "/v1/tasks", {}, None, "openai"),
                ("POST", "/v1/images/generations", {}, {"model": "local-image", "prompt": "a lighthouse"}, "openai"),
                ("POST", "/v1/chat/completions", {}, {"model": "gpt-4o", "messages": []}, "openai"),
                ("POST", "/anthropic/v1/messages", {"anthropic-version": "2023-06-01"},
                 {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": []}, "anthropic"),
                ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {}, {"contents": []}, "gemini"),
            ]
            started = time.monotonic()
            for method, path, extra, body, family in calls * 2:
                response = client.request(method, "/llm-api" + path, headers={**key, **extra}, json=body)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == "5"
                error = response.json()
                if family == "anthropic":
                    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
                elif family == "gemini":
                    assert error["error"]["status"] == "UNAVAILABLE"
                else:
                    assert error["error"]["code"] == "service_unavailable"
            assert time.monotonic() - started < 60  # each fails fast, not after a pool's 30 s wait
            assert client.get("/healthz").status_code == 503
            # The outage is logged once, not once per request.
            outage = [r for r in caplog.records if "database is unavailable" in r.getMessage()]
            assert len(outage) == 1
            relay.restore()
            deadline = time.monotonic() + 30
            while client.get("/v1/balance", headers=account.headers).status_code != 200:
                assert time.monotonic() < deadline, "the gateway did not come back with the database"
                time.sleep(0.2)


def _raw_get(sock: socket.socket, path: str, key: str) -> bytes:
    """One request on a kept-alive socket; the whole response (it has a Content-Length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_500_keeps_the_connection_alive(make_account, monkeypatch):
    from app.core import ledger
    from app.http.app import create_app

    account = make_account()

    def broken(conn, account_id):
        raise RuntimeError("a bug, for the test")

    with ThreadedServer(create_app(), log_level="critical") as server:
        monkeypatch.setattr(ledger, "balance", broken)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            first = _raw_get(sock, "/v1/balance", account.key)
            assert first.startswith(b"HTTP/1.1 500") and b'"code":"internal_error"' in first
            monkeypatch.undo()
            # The same connection serves the next request.
            second = _raw_get(sock, "/v1/balance", account.key)
            assert second.startswith(b"HTTP/1.1 200") and b'"balance"' in second


def _wrapped(orig: Exception):
    from sqlalchemy import exc

    return exc.OperationalError("SELECT 1", {}, orig)


def test_an_outage_is_told_from_a_statement_that_failed():
    import sqlite3

    import psycopg
    import psycopg_pool
    from psycopg import errors

    from app.core.db import is_outage

    outages = [psycopg.OperationalError("connection failed: server closed the connection unexpectedly"),
               errors.AdminShutdown(), errors.CannotConnectNow(), errors.TooManyConnections(),
               psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec"),
               _wrapped(sqlite3.OperationalError("database is locked")),
               _wrapped(sqlite3.OperationalError("database or disk is full"))]
    failures = [errors.DeadlockDetected(), errors.SerializationFailure(), errors.QueryCanceled(),
                _wrapped(sqlite3.OperationalError("no such table: accounts"))]
    assert [is_outage(e) for e in outages] == [True] * len(outages)
    assert [is_outage(e) for e in failures] == [False] * len(failures)
    assert [is_outage(_wrapped(e)) for e in outages[:4]] == [True] * 4
    assert [is_outage(_wrapped(e)) for e in failures[:3]] == [False] * 3


def test_a_deadlock_is_a_500_not_a_503(client, account, monkeypatch, caplog):
    from psycopg import errors

    from app.core import ledger

    def deadlocked(conn, account_id):
        raise _wrapped(errors.DeadlockDetected())

    monkeypatch.setattr(ledger, "balance", deadlocked)
    response = client.get("/v1/balance", headers=account.headers)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert any("unhandled error" in r.getMessage() for r in caplog.records)
