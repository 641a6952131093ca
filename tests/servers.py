"""Run an ASGI app on loopback in a background thread (fake upstreams, the gateway itself)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import uvicorn


def free_port() -> int:
    """A port nothing listens on now (for "unreachable" addresses, or a child process to bind:
    another socket may take it meanwhile, so servers in this process use `reserve` instead)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reserve(port: int = 0) -> socket.socket:
    """A bound socket: its port is ours (no outgoing connection can take it) until a server uses it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    return sock


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes from one stream to the other until either end closes (loopback relays and proxies)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class ThreadedServer:
    def __init__(self, app, port: int | None = None, sock: socket.socket | None = None, **config):
        self.sock = sock or reserve(port or 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config.setdefault("log_level", "warning")
        config.setdefault("lifespan", "on")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **config))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
