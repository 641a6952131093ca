"""create_app(settings): the routes, the front door, the error handlers and the lifespan."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from app.core import catalog
from app.core.errors import API_PREFIX, family_for, invalid
from app.core.settings import Settings, get_settings
from app.dashboard import routes as dashboard_routes
from app.http import account, health
from app.http.handlers import HANDLERS
from app.http.lifespan import lifespan
from app.images import routes as image_routes
from app.proxy import routes as proxy_routes
from app.proxy.formats import FORMATS, check
from app.webhooks import routes as webhook_routes


def api_routes(passthrough: proxy_routes.Router) -> list[BaseRoute]:
    # The LLM passthrough first: it is the busiest path, and none of the others' paths overlap it.
    return [*passthrough.routes(), *proxy_routes.routes, *image_routes.routes, *webhook_routes.routes,
            *account.routes]


class Gateway(Starlette):
    """The app, with a front door for the LLM passthrough.

    A passthrough POST goes straight to its endpoint (which answers its own
    errors) instead of through Starlette's middleware and router: on the
    busiest path that is about a tenth of the gateway's CPU per request.
    Everything else is routed as usual.
    """

    passthrough: proxy_routes.Router  # the passthrough endpoints, from the formats table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

        async def tracked(message: Message) -> None:
            nonlocal complete
            complete = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        try:
            await super().__call__(scope, receive, tracked)
        except Exception:
            # Starlette's error middleware re-raises what it answered with a 500 (logged by the
            # handler), so that the server may log it; a server that sees an exception closes the
            # connection, and the client's next request on it would fail too. The answer went out
            # whole: the connection lives on. A response broken off is raised.
            if not complete:
                raise


def create_app(settings: Settings | None = None) -> Gateway:
    """The web app on `settings` (read from the environment once when none are given)."""
    settings = settings or get_settings()
    offered = catalog.load(settings.catalog_path, settings.env)  # a bad catalog stops startup here
    check(offered, FORMATS)  # ... and so does an LLM model on an API its provider can't serve
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
        lifespan=lifespan(settings, offered),
        exception_handlers=HANDLERS,
    )
    app.passthrough = passthrough
    return app
