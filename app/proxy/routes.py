"""LLM passthrough routes: prepare the call (auth, model, hold), hand it to the forwarding response.

Every route is also mounted under /llm-api. Paths match the hosted service's,
so the documented Hermes Agent and OpenClaw base URLs work unchanged.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from app import pagination, params
from app.auth import require
from app.db import UNAVAILABLE
from app.errors import ANTHROPIC, GEMINI as GEMINI_FAMILY, OPENAI, APIError, server_error, unavailable
from app.proxy import calls, models_list, records
from app.proxy.forward import ProxyResponse
from app.proxy.usage import CHAT, GEMINI, MESSAGES, RESPONSES

log = logging.getLogger(__name__)
FAMILY_OF_API = {CHAT: OPENAI, RESPONSES: OPENAI, MESSAGES: ANTHROPIC, GEMINI: GEMINI_FAMILY}


class Passthrough:
    """POST endpoint forwarding one API format, as a bare ASGI app.

    It answers its own errors in its format's shape, so the app can hand it a
    request straight from the front door (`match`), with no router or
    middleware in between; as a Starlette route it works the same.
    """

    def __init__(self, api: str, version: str = "v1beta"):
        self.api = api
        self.version = version
        self.family = FAMILY_OF_API[api]

    async def __call__(self, scope, receive, send) -> None:
        state = scope["app"].state
        response = None
        try:
            target = scope.get("path_params", {}).get("target", "")
            call = await calls.prepare(scope, receive, state, self.api, version=self.version, target=target)
            response = ProxyResponse(call, state.llm, self.family)
            await response(scope, receive, send)
        except APIError as error:
            await error.response(self.family)(scope, receive, send)
        except calls.ClientGone:
            pass
        except UNAVAILABLE as exc:  # the database is down: auth or the hold could not be had
            if response is not None and response.started:
                raise
            state.outage.failed(exc, f"{scope['method']} {scope['path']}")
            await unavailable().response(self.family)(scope, receive, send)
        except Exception:
            if response is not None and response.started:
                raise  # the server ends the broken response
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await server_error().response(self.family)(scope, receive, send)


def _models(request: Request, *apis: str) -> list:
    return request.app.state.catalog.of_api(*apis)


async def _anthropic_models(request: Request) -> JSONResponse:
    await require(request)
    query = request.query_params
    return JSONResponse(models_list.anthropic(
        _models(request, MESSAGES), limit=params.optional_integer(query.get("limit"), "limit", 20, minimum=1,
                                                                  maximum=1000),
        after_id=query.get("after_id"), before_id=query.get("before_id")))


async def _gemini_models(request: Request) -> JSONResponse:
    await require(request, google=True)
    query = request.query_params
    return JSONResponse(models_list.gemini(
        _models(request, GEMINI),
        page_size=params.optional_integer(query.get("pageSize"), "pageSize", 50, minimum=1, maximum=1000),
        start=params.optional_integer(query.get("pageToken"), "pageToken", 0)))


async def list_models(request: Request) -> JSONResponse:
    """GET /v1/models: chat models; Anthropic's list for Anthropic clients, Gemini's for Google's."""
    if "anthropic-version" in request.headers:
        return await _anthropic_models(request)
    if "x-goog-api-key" in request.headers or "key" in request.query_params:
        return await _gemini_models(request)
    await require(request)
    return JSONResponse(models_list.openai(_models(request, CHAT)))


async def list_responses_models(request: Request) -> JSONResponse:
    await require(request)
    return JSONResponse(models_list.openai(_models(request, RESPONSES)))


async def list_anthropic_models(request: Request) -> JSONResponse:
    return await _anthropic_models(request)


async def list_gemini_models(request: Request) -> JSONResponse:
    return await _gemini_models(request)


async def usage(request: Request):
    """GET /v1/usage: the key's account's records, newest first; `?format=csv` streams them all."""
    principal = await require(request)
    query = request.query_params
    filters = records.parse_filters(query)
    limit = records.parse_limit(query.get("limit"))
    engine = request.app.state.engine
    await request.app.state.llm.written()  # a script that calls and then lists sees its call
    if query.get("format") == "csv":
        cursor = query.get("cursor")
        if cursor:
            pagination.decode_cursor(cursor)  # a bad cursor is a 400 now, not a broken download later
        return StreamingResponse(_csv(engine, principal.account_id, filters, cursor), media_type="text/csv",
                                 headers={"content-disposition": 'attachment; filename="usage.csv"'})
    async with engine.connect() as conn:
        rows, next_cursor = await conn.run_sync(records.page, principal.account_id, filters,
                                                cursor=query.get("cursor"), limit=limit)
    return JSONResponse({"object": "list", "data": rows, "has_more": next_cursor is not None,
                         "next_cursor": next_cursor})


async def _csv(engine, account_id: int, filters: records.Filters, cursor: str | None):
    """The CSV a page at a time, so a year of records never sits in memory."""
    header = True
    while True:
        async with engine.connect() as conn:
            rows, cursor = await conn.run_sync(records.page, account_id, filters, cursor=cursor,
                                               limit=records.MAX_LIMIT)
        yield records.csv_text(rows, header=header)
        header = False
        if cursor is None:
            return


# The passthrough endpoints by exact path, and Gemini's by prefix (`{model}:{method}` follows).
PASSTHROUGH = {
    "/v1/chat/completions": Passthrough(CHAT),
    "/v1/responses": Passthrough(RESPONSES),
    "/api.openai.com/v1/responses": Passthrough(RESPONSES),
    "/v1/messages": Passthrough(MESSAGES),
    "/anthropic/v1/messages": Passthrough(MESSAGES),
}
GEMINI_PASSTHROUGH = {"/v1beta/models/": Passthrough(GEMINI, "v1beta"), "/v1/models/": Passthrough(GEMINI, "v1")}
PREFIX = "/llm-api"


def match(path: str) -> tuple[Passthrough, str] | None:
    """The passthrough endpoint a POST to `path` goes to, and its Gemini target; None for any other path.

    The app's front door asks this before its router, so the busiest requests skip
    route matching and middleware; `routes` below serves the same endpoints for the rest."""
    if path.startswith(PREFIX):
        path = path[len(PREFIX):]
    endpoint = PASSTHROUGH.get(path)
    if endpoint is not None:
        return endpoint, ""
    for prefix, endpoint in GEMINI_PASSTHROUGH.items():
        if path.startswith(prefix):
            return endpoint, path[len(prefix):]
    return None


routes = [
    *(Route(path, endpoint, methods=["POST"]) for path, endpoint in PASSTHROUGH.items()),
    *(Route(prefix + "{target:path}", endpoint, methods=["POST"]) for prefix, endpoint in GEMINI_PASSTHROUGH.items()),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/api.openai.com/v1/models", list_responses_models, methods=["GET"]),
    Route("/anthropic/models", list_anthropic_models, methods=["GET"]),
    Route("/anthropic/v1/models", list_anthropic_models, methods=["GET"]),
    Route("/v1beta/models", list_gemini_models, methods=["GET"]),
    Route("/v1/usage", usage, methods=["GET"]),
]
