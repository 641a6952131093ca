"""create_app(settings): routes, error handlers and the lifespan that owns long-lived clients."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from app.http import account, health
from app.core import auth, catalog
from app import storage
from app.dashboard import routes as dashboard_routes
from app.core.db import UNAVAILABLE, OutageLog, is_outage, make_async_engine, make_engine, open_psycopg_pool, run
from app.images.outbox import Relay
from app.core.errors import API_PREFIX, APIError, family_for, invalid, server_error, unavailable
from app.images import routes as image_routes
from app.proxy import routes as proxy_routes
from app.proxy.formats import FORMATS
from app.proxy.gateway import LLMGateway
from app.core.settings import Settings, get_settings
from app.webhooks import routes as webhook_routes

log = logging.getLogger(__name__)
KEY_USE_FLUSH_SECONDS = 30.0
# Collect the youngest generation every this many net allocations instead of Python's 700:
# each request allocates a few hundred short-lived objects (measured: 5-7% more LLM
# passthrough throughput). Cyclic garbage then lives a little longer; memory barely moves.
GC_THRESHOLD = 20_000


def api_routes(passthrough: proxy_routes.Router) -> list:
    # The LLM passthrough first: it is the busiest path, and none of the others' paths overlap it.
    return [*passthrough.routes(), *proxy_routes.routes, *image_routes.routes, *webhook_routes.routes,
            *account.routes]


async def _flush_key_use(app: Starlette) -> None:
    while True:
        await asyncio.sleep(KEY_USE_FLUSH_SECONDS)
        used = app.state.auth.take_used()
        if used:
            with contextlib.suppress(Exception):
                await run(app.state.engine, auth.mark_used, used)


class Gateway(Starlette):
    """The app, with a front door for the LLM passthrough.

    A passthrough POST goes straight to its endpoint (which answers its own
    errors) instead of through Starlette's middleware and router: on the
    busiest path that is about a tenth of the gateway's CPU per request.
    Everything else is routed as usual.
    """

    passthrough: proxy_routes.Router  # the passthrough endpoints, from the formats table

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if scope["method"] == "POST":
            path = scope["path"]
            root = scope.get("root_path")
            found = self.passthrough.match(path[len(root):] if root and path.startswith(root) else path)
            if found is not None:
                endpoint, target = found
                scope["app"] = self
                scope["path_params"] = {"target": target}
                await endpoint(scope, receive, send)
                return
        if b"%00" in scope.get("raw_path", b"") or b"%00" in scope.get("query_string", b""):
            # No path or query value may hold a NUL: PostgreSQL refuses it in any text it is given.
            error = invalid(None, "The URL contains a NUL character (%00), which no parameter may hold.")
            family = family_for(scope["path"], Headers(scope=scope), scope["query_string"].decode("latin-1"))
            await error.response(family)(scope, receive, send)
            return
        complete = False

        async def tracked(message) -> None:
            nonlocal complete
            complete = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        try:
            await super().__call__(scope, receive, tracked)
        except Exception:
            # Starlette's error middleware re-raises what it answered with a 500 (logged by
            # _server_error), so that the server may log it; a server that sees an exception
            # closes the connection, and the client's next request on it would fail too. The
            # answer went out whole: the connection lives on. A response broken off is raised.
            if not complete:
                raise


@contextlib.contextmanager
def _tuned_gc():
    """While the app serves: what startup made (it lives as long as the process) is moved out of
    the collector's way, and the youngest generation is collected less often. Both are undone
    at shutdown, so a process that runs several apps in turn (the tests) doesn't keep
    everything from before each start frozen for good."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def create_app(settings: Settings | None = None) -> Gateway:
    settings = settings or get_settings()
    offered = catalog.load(settings.catalog_path, settings.env)  # a bad catalog stops startup here
    files = storage.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        from workers.celery_app import dispatch_waker, make_celery

        state = app.state
        state.engine = make_async_engine(settings.database_url, pool_size=settings.db_pool_size)
        state.pg_pool = await open_psycopg_pool(settings.database_url, settings.db_pool_size)
        state.sync_engine = make_engine(settings.database_url, pool_size=2)
        state.auth = auth.Authenticator(state.engine, settings.key_cache_seconds)
        state.celery = make_celery(settings)
        state.relay = Relay(dispatch_waker(state.celery))
        state.relay.start()
        state.llm = LLMGateway(settings.database_url, offered, https_proxy=settings.https_proxy,
                               no_proxy=settings.no_proxy, drain_seconds=settings.usage_drain_seconds)
        await state.llm.start()
        flusher = asyncio.create_task(_flush_key_use(app))
        with _tuned_gc():
            try:
                yield
            finally:
                flusher.cancel()
                await state.llm.stop()  # writes the usage still queued
                with contextlib.suppress(Exception):
                    await run(state.engine, auth.mark_used, state.auth.take_used())
                state.relay.stop()
                if state.pg_pool is not None:
                    await state.pg_pool.close()
                await state.engine.dispose()
                state.sync_engine.dispose()

    passthrough = proxy_routes.Router(FORMATS.values())
    routes = api_routes(passthrough)
    static = StaticFiles(directory=str(settings.files_dir), check_dir=False)
    app = Gateway(
        routes=[
            *health.routes,
            Route("/", dashboard_routes.to_dashboard, methods=["GET"]),
            Mount("/dashboard", routes=dashboard_routes.routes),
            Mount("/files", app=static, name="files"),
            Mount(API_PREFIX + "/files", app=static),
            Mount(API_PREFIX, routes=routes),
            *routes,
        ],
        lifespan=lifespan,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, ClientDisconnect: _gone,
                            **{kind: _unavailable for kind in UNAVAILABLE}, Exception: _server_error},
    )
    app.passthrough = passthrough
    app.state.settings = settings
    app.state.outage = OutageLog()
    app.state.catalog = offered
    app.state.storage = files
    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response(family_for(request.url.path, request.headers, request.url.query))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    messages = {404: f"No route {request.method} {request.url.path}.", 405: "Method not allowed."}
    error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                     code="not_found" if exc.status_code == 404 else None, headers=exc.headers)
    return error.response(family_for(request.url.path, request.headers, request.url.query))


async def _gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client went away mid-request: nothing to answer, nothing to log."""
    return Response(status_code=499)


async def _unavailable(request: Request, exc: Exception) -> Response:
    if not is_outage(exc):  # a statement failed (a deadlock, a bug): a 500, logged as one
        return await _server_error(request, exc)
    request.app.state.outage.failed(exc, f"{request.method} {request.url.path}")
    error = unavailable()
    if request.url.path.startswith("/dashboard"):
        return PlainTextResponse("The dashboard's database is unavailable. Try again in a few seconds.\n",
                                 status_code=503, headers=error.headers)
    return error.response(family_for(request.url.path, request.headers, request.url.query))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return server_error().response(family_for(request.url.path, request.headers, request.url.query))
