"""A webhook receiver on loopback, as a customer would run one, for the tests.

Each test takes its own path (`receiver.url(name)`) and scripts its answers:
`script(name, [500, 500, 200])` answers the first calls with those statuses and
then the last one for ever; ("sleep", S, status) waits S seconds first;
("redirect", url) answers 302. Every request is kept with its headers and raw body.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    def __init__(self):
        self.base = ""  # set by the fixture once the server listens
        self.requests: dict[str, list[Received]] = {}
        self._scripts: dict[str, list] = {}
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/hooks/{name}", self.hook, methods=["POST", "GET"])])

    def url(self, name: str) -> str:
        return f"{self.base}/hooks/{name}"

    def script(self, name: str, answers: list) -> None:
        with self._lock:
            self._scripts[name] = list(answers)

    def received(self, name: str) -> list[Received]:
        with self._lock:
            return list(self.requests.get(name, []))

    def wait_for(self, name: str, count: int = 1, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received(name)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver {name}: {len(got)} of {count} requests after {timeout}s")
            time.sleep(0.05)

    async def hook(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        with self._lock:
            self.requests.setdefault(name, []).append(
                Received(request.url.path, {k.lower(): v for k, v in request.headers.items()}, body, time.time()))
            script = self._scripts.get(name) or [200]
            answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, tuple) and answer[0] == "sleep":
            await asyncio.sleep(answer[1])
            answer = answer[2]
        if isinstance(answer, tuple) and answer[0] == "redirect":
            return Response(status_code=302, headers={"location": answer[1]})
        return Response(b"ok" if answer < 300 else b"no", status_code=answer)
