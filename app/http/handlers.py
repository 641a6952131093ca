"""The app's exception handlers: every error the gateway answers itself, in the route's own shape."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response

from app.core.errors import APIError, answer_unexpected, family_for
from app.core.services import services

log = logging.getLogger(__name__)


def _family(request: Request) -> str:
    return family_for(request.url.path, request.headers, request.url.query)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response(_family(request))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: f"No route {request.method} {request.url.path}.", 405: "Method not allowed."}
    error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                     code="not_found" if exc.status_code == 404 else None,
                     headers=dict(exc.headers) if exc.headers else None)
    return error.response(_family(request))


async def gone(request: Request, exc: Exception) -> Response:
    """The client went away mid-request: nothing to answer, nothing to log."""
    return Response(status_code=499)


async def unexpected(request: Request, exc: Exception) -> Response:
    """A 503 while the database is unavailable, else a 500 (app.core.errors.answer_unexpected)."""
    error = answer_unexpected(exc, services(request).outage, f"{request.method} {request.url.path}")
    if error.status == 503 and request.url.path.startswith("/dashboard"):
        return PlainTextResponse("The dashboard's database is unavailable. Try again in a few seconds.\n",
                                 status_code=503, headers=error.headers)
    return error.response(_family(request))


HANDLERS = {APIError: api_error, HTTPException: http_error, ClientDisconnect: gone, Exception: unexpected}
