"""LLM passthrough routes: prepare the call (auth, model, hold), hand it to the forwarding response.

Every route is also mounted under /llm-api. Paths match the hosted service's,
so the documented Hermes Agent and OpenClaw base URLs work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.core import pagination, params
from app.core.auth import require
from app.core.catalog import Model
from app.core.errors import API_PREFIX, APIError, answer_unexpected
from app.core.services import of_scope, services
from app.proxy import calls, history, models_list
from app.proxy.formats import CHAT, FORMATS, GEMINI, MESSAGES, RESPONSES, Format
from app.proxy.forward import ProxyResponse

log = logging.getLogger(__name__)


class Passthrough:
    """POST endpoint forwarding one API format, as a bare ASGI app.

    It answers its own errors in its format's shape, so the app can hand it a
    request straight from the front door (`match`), with no router or
    middleware in between; as a Starlette route it works the same.
    """

    def __init__(self, format_: Format, version: str = "v1beta"):
        self.format = format_
        self.version = version
        self.family = format_.family

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = of_scope(scope)
        response = None
        try:
            target = scope.get("path_params", {}).get("target", "")
            call = await calls.prepare(scope, receive, state, self.format, version=self.version, target=target)
            response = ProxyResponse(call, state.llm, self.family)
            await response(scope, receive, send)
        except APIError as error:
            await error.response(self.family)(scope, receive, send)
        except calls.ClientGone:
            pass
        except Exception as exc:
            if response is not None and response.started:
                raise  # the server ends the broken response
            # The database away (auth or the hold could not be had), or a bug: as the app's handler.
            answer = answer_unexpected(exc, state.outage, f"{scope['method']} {scope['path']}")
            await answer.response(self.family)(scope, receive, send)


def _models(request: Request, *apis: str) -> list:
    return services(request).catalog.of_api(*apis)


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
    """GET /api.openai.com/v1/models: every model on OpenAI's formats (Chat Completions, Responses)."""
    await require(request)
    return JSONResponse(models_list.openai(_models(request, CHAT, RESPONSES)))


def _one(request: Request, apis: tuple[str, ...]) -> Model:
    """The model named in the path, offered on one of `apis`; else a 404 (in the route's shape)."""
    name = request.path_params["model_id"].removeprefix("models/")
    model = services(request).catalog.get(name, apis)
    if model is None:
        raise APIError(404, FORMATS[apis[0]].not_found(name, "v1beta"), code="model_not_found", param="model")
    return model


async def get_model(request: Request) -> JSONResponse:
    """GET /v1/models/{id}: one model, in OpenAI's shape; Anthropic's for Anthropic clients
    (`anthropic-version`), Gemini's for Google's (its key in `x-goog-api-key` or `?key=`)."""
    if "anthropic-version" in request.headers:
        return await get_anthropic_model(request)
    if "x-goog-api-key" in request.headers or "key" in request.query_params:
        return await get_gemini_model(request)
    await require(request)
    return JSONResponse(models_list.openai_model(_one(request, (CHAT, RESPONSES))))


async def get_anthropic_model(request: Request) -> JSONResponse:
    await require(request)
    return JSONResponse(models_list.anthropic_model(_one(request, (MESSAGES,))))


async def get_gemini_model(request: Request) -> JSONResponse:
    await require(request, google=True)
    return JSONResponse(models_list.gemini_model(_one(request, (GEMINI,))))


async def list_anthropic_models(request: Request) -> JSONResponse:
    return await _anthropic_models(request)


async def list_gemini_models(request: Request) -> JSONResponse:
    return await _gemini_models(request)


async def usage(request: Request) -> Response:
    """GET /v1/usage: the key's account's records, newest first; `?format=csv` streams them all."""
    principal = await require(request)
    query = request.query_params
    filters = history.parse_filters(query)
    limit = history.parse_limit(query.get("limit"))
    engine = services(request).engine
    await services(request).llm.written()  # a script that calls and then lists sees its call
    if query.get("format") == "csv":
        cursor = query.get("cursor")
        if cursor:
            pagination.decode_cursor(cursor)  # a bad cursor is a 400 now, not a broken download later
        return StreamingResponse(history.csv_pages(engine, principal.account_id, filters, cursor),
                                 media_type="text/csv",
                                 headers={"content-disposition": 'attachment; filename="usage.csv"'})
    async with engine.connect() as conn:
        rows, next_cursor = await conn.run_sync(history.page, principal.account_id, filters,
                                                cursor=query.get("cursor"), limit=limit)
    return JSONResponse({"object": "list", "data": rows, "has_more": next_cursor is not None,
                         "next_cursor": next_cursor})


class Router:
    """The passthrough endpoints of `formats`: by exact path, and by prefix for a format that
    names its model in the path (Gemini: `{model}:{method}` follows the prefix)."""

    def __init__(self, formats: Iterable[Format]):
        self.exact: dict[str, Passthrough] = {}
        self.prefixes: list[tuple[str, Passthrough]] = []
        for format_ in formats:
            self.exact.update({path: Passthrough(format_) for path in format_.paths})
            self.prefixes += [(prefix, Passthrough(format_, version)) for prefix, version in format_.path_prefixes]

    def match(self, path: str) -> tuple[Passthrough, str] | None:
        """The endpoint a POST to `path` goes to, and what follows its prefix; None for any other path.

        The app's front door asks this before its router, so the busiest requests skip route
        matching and middleware; `routes` serves the same endpoints for the rest."""
        if path.startswith(API_PREFIX):
            path = path[len(API_PREFIX):]
        endpoint = self.exact.get(path)
        if endpoint is not None:
            return endpoint, ""
        for prefix, endpoint in self.prefixes:
            if path.startswith(prefix):
                return endpoint, path[len(prefix):]
        return None

    def routes(self) -> list[Route]:
        return [*(Route(path, endpoint, methods=["POST"]) for path, endpoint in self.exact.items()),
                *(Route(prefix + "{target:path}", endpoint, methods=["POST"]) for prefix, endpoint in self.prefixes)]


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/api.openai.com/v1/models", list_responses_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/api.openai.com/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/anthropic/v1/models/{model_id:path}", get_anthropic_model, methods=["GET"]),
    Route("/v1beta/models/{model_id:path}", get_gemini_model, methods=["GET"]),
    Route("/anthropic/models", list_anthropic_models, methods=["GET"]),
    Route("/anthropic/v1/models", list_anthropic_models, methods=["GET"]),
    Route("/v1beta/models", list_gemini_models, methods=["GET"]),
    Route("/v1/usage", usage, methods=["GET"]),
]
