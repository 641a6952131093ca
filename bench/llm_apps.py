"""The ASGI apps `python -m bench.proxy` serves besides mediagate.

- `upstream`: a minimal OpenAI Chat Completions endpoint (JSON, or SSE with
  BENCH_CHUNKS content chunks), as cheap as an ASGI app gets, so the numbers
  measure the proxy and not the fake.
- `bare_httpx`, `bare_aiohttp`: the thinnest Starlette passthrough to
  BENCH_UPSTREAM on each HTTP client, the yardstick for choosing one.
- `bare_asgi`: the thinnest passthrough there is on this stack: a raw ASGI
  callable on aiohttp, no framework, no key, no metering. The floor.
- `bare_asgi_pool`: the same floor on mediagate's own client (app/proxy/client.py).
- `bare_asgi_pyreqwest`: the same floor on pyreqwest, when it is installed.
"""

from __future__ import annotations

import contextlib
import json
import os

CHUNKS = int(os.environ.get("BENCH_CHUNKS", "20"))
UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9")
USAGE = {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS,
         "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
_BASE = {"id": "chatcmpl-bench", "created": 1767225600, "model": "bench-chat", "system_fingerprint": "fp_bench"}


def _chunk(delta: dict, finish=None, usage=False) -> bytes:
    obj = {**_BASE, "object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage:
        obj["usage"] = None
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _events(include_usage: bool) -> list[bytes]:
    events = [_chunk({"role": "assistant", "content": ""}, usage=include_usage)]
    events += [_chunk({"content": f" token{i}"}, usage=include_usage) for i in range(CHUNKS)]
    events.append(_chunk({}, "stop", usage=include_usage))
    if include_usage:
        last = {**_BASE, "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
        events.append(b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


STREAM = {True: _events(True), False: _events(False)}
WHOLE = json.dumps({**_BASE, "object": "chat.completion", "choices": [{
    "index": 0, "message": {"role": "assistant", "content": "Hello! " * 20}, "logprobs": None,
    "finish_reason": "stop"}], "usage": USAGE}, separators=(",", ":")).encode()
JSON_HEADERS = [(b"content-type", b"application/json"), (b"x-request-id", b"req_bench")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-request-id", b"req_bench")]


async def upstream(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if b'"stream":true' not in body:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(WHOLE)).encode())]})
        await send({"type": "http.response.body", "body": WHOLE})
        return
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    for event in STREAM[b'"include_usage":true' in body]:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _bare(client: str):
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    target = UPSTREAM + "/v1/chat/completions"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if client == "httpx":
            import httpx

            app.state.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None), timeout=60)
            yield
            await app.state.client.aclose()
        else:
            import aiohttp

            app.state.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            yield
            await app.state.client.close()

    async def forward(request: Request):
        body = await request.body()
        headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
        if client == "httpx":
            upstream_request = request.app.state.client.build_request("POST", target, content=body, headers=headers)
            response = await request.app.state.client.send(upstream_request, stream=True)
            return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                     media_type=response.headers.get("content-type"),
                                     background=BackgroundTask(response.aclose))
        response = await request.app.state.client.post(target, data=body, headers=headers)
        return StreamingResponse(response.content.iter_any(), status_code=response.status,
                                 media_type=response.headers.get("content-type"))

    return Starlette(routes=[Route("/v1/chat/completions", forward, methods=["POST"])], lifespan=lifespan)


def bare_httpx():
    return _bare("httpx")


def bare_aiohttp():
    return _bare("aiohttp")


def upstream_starlette():
    """The same endpoint written the usual way, as a Starlette app (the default upstream of the benchmark)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def completions(request: Request):
        body = await request.body()
        if b'"stream":true' not in body:
            return Response(WHOLE, media_type="application/json", headers={"x-request-id": "req_bench"})

        async def events():
            for event in STREAM[b'"include_usage":true' in body]:
                yield event

        return StreamingResponse(events(), media_type="text/event-stream; charset=utf-8",
                                 headers={"x-request-id": "req_bench"})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def _bare_asgi(open_client, close_client, forward):
    """A raw ASGI passthrough: `forward(client, body, send)` makes the upstream call and answers."""
    clients = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                clients.append(open_client())
                await send({"type": "lifespan.startup.complete"})
            await close_client(clients[0])
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await forward(clients[0], body, send)

    return app


_TARGET = UPSTREAM + "/v1/chat/completions"
_HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}


def bare_asgi():
    import aiohttp

    async def forward(session, body, send):
        async with session.post(_TARGET, data=body, headers=_HEADERS) as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", response.headers["content-type"].encode())]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return _bare_asgi(lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)),
                      lambda session: session.close(), forward)


def bare_asgi_pool():
    """The floor again on mediagate's own client (app/proxy/client.py), which the proxy uses."""
    from app.proxy.client import Pool

    async def forward(pool, body, send):
        response = await pool.post(_TARGET, _HEADERS, body)
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(b"content-type", response.header(b"content-type"))]})
        async for chunk in response.iter_chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        response.release()
        await send({"type": "http.response.body", "body": b""})

    async def close(pool):
        pool.close()

    return _bare_asgi(lambda: Pool(UPSTREAM, connect_timeout=15, read_timeout=600), close, forward)


def bare_asgi_pyreqwest():
    """The floor again on pyreqwest (Rust's reqwest and tokio on a thread of their own), the
    fastest other client measured; `pip install pyreqwest` (the `bench` extra) to include it."""
    from pyreqwest.client import ClientBuilder

    async def forward(client, body, send):
        async with client.post(_TARGET).headers(_HEADERS).body_bytes(body).build_streamed() as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", response.get_header("content-type").encode())]})
            reader = response.body_reader
            while (chunk := await reader.read()) is not None:
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return _bare_asgi(lambda: ClientBuilder().build(), lambda client: client.close(), forward)
