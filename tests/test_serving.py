"""Slow and idle clients (app/http/serving.py), against real uvicorn servers on loopback: slowloris
headers and stalled bodies are closed after their timeouts while ordinary requests keep their
latency, a slow app keeps its client, the connection cap answers a clear 503, and `mediagate
serve --workers 2` raises the open-file limit and serves with all of it in its spawned workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from app.http.serving import ConnectionLimits, http_protocol
from tests.conftest import ROOT
from tests.servers import ThreadedServer, free_port

TIMEOUT = 3.0  # both timeouts of the test servers, seconds
SLOW_APP = 2 * TIMEOUT  # how long the slow endpoint waits before it reads the body


class Disconnects:
    """What the test app saw of requests whose client was cut."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()


Served = tuple[ThreadedServer, Disconnects]


def make_app(disconnects: Disconnects) -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def stream(request: Request) -> PlainTextResponse:
        try:
            size = sum([len(chunk) async for chunk in request.stream()])
        except ClientDisconnect:  # what a stalled body's request sees when its connection is closed
            with disconnects.lock:
                disconnects.count += 1
            return PlainTextResponse("", status_code=499)  # to no one: uvicorn drops it
        return PlainTextResponse(str(size))

    async def read_late(request: Request) -> JSONResponse:
        await asyncio.sleep(SLOW_APP)  # busy elsewhere before it reads the body
        return JSONResponse({"length": len(await request.body())})

    return Starlette(routes=[Route("/", ok), Route("/stream", stream, methods=["POST"]),
                             Route("/read-late", read_late, methods=["POST"])])


@contextlib.contextmanager
def serve(limits: ConnectionLimits) -> Iterator[Served]:
    disconnects = Disconnects()
    with ThreadedServer(make_app(disconnects), http=http_protocol(limits), backlog=2048,
                        lifespan="off") as server:
        yield server, disconnects


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with serve(ConnectionLimits(header_timeout=TIMEOUT, body_timeout=TIMEOUT, max_connections=2000)) as served:
        yield served


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    return sock


def timed_get(port: int) -> float:
    """One GET / on a new connection, to the end of its answer: seconds."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok"), answer
    return time.perf_counter() - started


def closed_by_server(sock: socket.socket) -> bool:
    """Has the server closed it? (A readable socket here reads EOF, or a reset when a trickled
    byte crossed the server's close.)"""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def stalled_body(port: int) -> socket.socket:
    """A request whose chunked body stops after its first chunk, never sending the last one."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT + 3)
    sock.sendall(b"POST /stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    return sock


def latencies(port: int, count: int = 40) -> tuple[float, float]:
    times = [timed_get(port) for _ in range(count)]
    return statistics.median(times), max(times)


def test_slowloris_and_stalled_bodies_are_closed_while_others_keep_their_latency(server: Served) -> None:
    served, disconnects = server
    base_p50, base_max = latencies(served.port)

    started = time.monotonic()
    # Headers that never end, one more byte every 0.3 s (a timeout on silence would never fire).
    heads = [connect(served.port) for _ in range(300)]
    for sock in heads:
        sock.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    bodies = [stalled_body(served.port) for _ in range(30)]
    for sock in bodies:
        sock.setblocking(False)
    slow_p50, slow_max = latencies(served.port)
    measured_in = time.monotonic() - started
    print(f"\nGET / without slow sockets: p50 {base_p50 * 1000:.1f} ms, max {base_max * 1000:.1f} ms; "
          f"with 330 open: p50 {slow_p50 * 1000:.1f} ms, max {slow_max * 1000:.1f} ms")
    assert measured_in < TIMEOUT, "the slow sockets were not all open while measuring"
    assert slow_p50 < 5 * base_p50 + 0.02 and slow_max < 0.5

    open_socks = {sock: kind for kind, group in (("head", heads), ("body", bodies)) for sock in group}
    closed_at: dict[str, list[float]] = {"head": [], "body": []}
    during: list[float] = []  # GET / while the slow sockets trickle and are closed
    deadline = started + TIMEOUT + 5
    while open_socks and time.monotonic() < deadline:
        readable, _, _ = select.select(list(open_socks), [], [], 0.3)
        for sock in readable:
            if closed_by_server(sock):
                closed_at[open_socks.pop(sock)].append(time.monotonic() - started)
                sock.close()
        for sock, kind in open_socks.items():
            if kind == "head":
                with contextlib.suppress(OSError):
                    sock.send(b"x")
        during.append(timed_get(served.port))
    for sock in open_socks:
        sock.close()
    assert not open_socks, f"{len(open_socks)} slow sockets still open {TIMEOUT + 5} s after the timeout"
    print(f"closed after {min(closed_at['head']):.2f}-{max(closed_at['head']):.2f} s (headers), "
          f"{min(closed_at['body']):.2f}-{max(closed_at['body']):.2f} s (bodies); GET / meanwhile: p50 "
          f"{statistics.median(during) * 1000:.1f} ms, max {max(during) * 1000:.1f} ms ({len(during)} requests)")
    assert max(during) < 0.5
    # Not before their time: opening them took well under a second.
    assert min(closed_at["head"] + closed_at["body"]) > TIMEOUT - 0.5
    deadline = time.monotonic() + 5
    while disconnects.count < len(bodies) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert disconnects.count == len(bodies)  # the app saw http.disconnect for each stalled body
    assert timed_get(served.port) < 0.5


def test_a_slow_but_steady_body_is_not_cut(server: Served) -> None:
    """Between reads, not in all: a body that takes twice the timeout but never pauses that long
    arrives, while one that stalls beside it is closed."""
    served, _ = server
    stalled = stalled_body(served.port)
    chunks = 10  # 3 s in all, twice the timeout, but never silent for more than 0.3 s
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(b"POST /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(chunks):
            sock.sendall(b"5\r\nhello\r\n")
            time.sleep(2 * TIMEOUT / chunks)
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n%d" % (5 * chunks)), answer
    with stalled:
        assert closed_by_server(stalled)


def _big_body_read_late(port: int) -> httpx.Response:
    # 1 MiB: uvicorn stops reading at 64 KiB until the app reads, so the client is blocked meanwhile.
    return httpx.post(f"http://127.0.0.1:{port}/read-late", content=b"x" * (1 << 20), timeout=20)


def _expect_continue_read_late(port: int) -> bytes:
    # The client sends its body only after `100 Continue`, which the app's first read sends.
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"POST /read-late HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.sendall(b"hello")
        answer = b""
        while not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        return answer


def test_a_slow_app_does_not_get_its_client_cut(server: Served) -> None:
    """Silence the server causes is not the client's: the app waits 2x the body timeout before
    reading a body that fills uvicorn's buffer, and one that waits for `100 Continue`; a body
    that stalls beside them is closed."""
    served, _ = server
    stalled = stalled_body(served.port)
    results: dict[str, object] = {}

    def run(name: str, call: Callable[[int], object]) -> None:
        try:
            results[name] = call(served.port)
        except Exception as exc:  # reported below, with the other case's result
            results[name] = exc

    threads = [threading.Thread(target=run, args=("big", _big_body_read_late)),
               threading.Thread(target=run, args=("continue", _expect_continue_read_late))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    big = results["big"]
    assert isinstance(big, httpx.Response) and big.json() == {"length": 1 << 20}, results
    assert isinstance(results["continue"], bytes) and results["continue"].endswith(b'{"length":5}'), results
    with stalled:
        assert closed_by_server(stalled)


def test_past_the_connection_cap_a_client_gets_a_clear_503() -> None:
    with serve(ConnectionLimits(header_timeout=60, body_timeout=60, max_connections=20)) as (served, _):
        idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(20)]
        deadline = time.monotonic() + 5
        while len(served.server.server_state.connections) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(10):  # a client that sends its request before reading still gets the 503 whole
            r = httpx.get(served.url + "/", timeout=5)
            assert r.status_code == 503
            assert r.json() == {"error": {"message": "This server has too many open connections; retry in a "
                                                     "moment.", "type": "server_error", "param": None,
                                          "code": "too_many_connections"}}
            assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:  # one that sends nothing
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503 ") and json.loads(body)["error"]["code"] == "too_many_connections"
        assert len(served.server.server_state.connections) == 20  # refused ones are not counted
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 5
        while served.server.server_state.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(served.url + "/", timeout=5).text == "ok"


def test_a_flood_past_the_cap_is_cut_without_lingering() -> None:
    # Answered refusals hold a descriptor for a moment each; past MAX_LINGERING of them at once,
    # further ones are cut at once, so a flood can't use up the process's reserve.
    with serve(ConnectionLimits(header_timeout=60, body_timeout=60, max_connections=5, max_lingering=3)) as (served, _):
        idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(5)]
        deadline = time.monotonic() + 5
        while len(served.server.server_state.connections) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        flood = [socket.create_connection(("127.0.0.1", served.port), timeout=5) for _ in range(10)]
        try:
            time.sleep(1)  # all of them accepted (and refused) before any is read and closed
            answers = []
            for sock in flood:
                got = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := sock.recv(65536):
                        got += chunk
                answers.append(got.startswith(b"HTTP/1.1 503 "))
            assert sum(answers) == 3  # three answered while they linger; the other seven cut at once
        finally:
            for sock in flood + idle:
                sock.close()


def _open_file_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit for {pid}")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_with_workers_raises_the_file_limit_and_guards_every_worker(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAGATE_")}
    env.update({"MEDIAGATE_DATA_DIR": str(tmp_path / "data"), "MEDIAGATE_HEADER_TIMEOUT": "1"})
    log = open(tmp_path / "serve.log", "w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "2"], cwd=ROOT, env=env,
        stdout=log, stderr=subprocess.STDOUT,
        # Started as a shell's `ulimit -Sn 512` would: a low soft limit under a higher hard one.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)))
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code in (200, 503):
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        # uvicorn's workers, not the embedded Celery worker or multiprocessing's resource tracker.
        workers = [pid for pid in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        for pid in [proc.pid, *workers]:
            assert _open_file_limits(pid)[0] == _open_file_limits(pid)[1] != 512
        # In the spawned workers (the parent serves nothing): headers that never end are closed.
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        started = time.monotonic()
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        for sock in socks:
            assert closed_by_server(sock)
            sock.close()
        assert 0.5 < time.monotonic() - started < 4
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_the_connection_cap_fits_the_open_file_limit() -> None:
    from app.http.serving import FD_RESERVE, connection_cap

    assert connection_cap(4096, 1_048_576) == 4096
    # At 1,024 descriptors, two a connection beside the process's own: 384, not 4,096.
    assert connection_cap(4096, 1024) == (1024 - FD_RESERVE) // 2 == 384
    assert connection_cap(0, 1024) == 384  # "no cap" is still what the descriptors allow
