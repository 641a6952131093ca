"""Image task routes: parse, call one service function, render."""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app import ledger
from app.auth import require
from app.db import run
from app.errors import APIError, insufficient_balance, invalid, not_found
from app.images import service, validation

MAX_BODY = 64 * 1024 * 1024


async def read_json(request: Request, max_bytes: int = MAX_BODY) -> object:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"The request body is larger than {max_bytes // (1024 * 1024)} MiB.",
                       code="request_too_large")
    body = await request.body()
    if len(body) > max_bytes:
        raise APIError(413, "The request body is too large.", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise invalid(None, "The request body is not valid JSON.", "invalid_json") from None


async def create_generation(request: Request) -> JSONResponse:
    principal = await require(request)
    state = request.app.state
    body = await read_json(request)
    parsed, data_uris = validation.parse(body, state.catalog)
    if data_uris:
        await run_in_threadpool(validation.verify_data_uris, parsed, data_uris, state.settings.max_reference_bytes)
    try:
        task = await run(state.engine, service.submit, principal, parsed)
    except ledger.InsufficientBalance:
        raise insufficient_balance(
            f"Your balance is too low for {parsed.model.name} at {parsed.resolution}. Top up and try again."
        ) from None
    state.relay.wake()  # after the commit: the relay hands the task to a worker
    return JSONResponse(task, status_code=202)


async def get_task(request: Request) -> JSONResponse:
    principal = await require(request)
    async with request.app.state.engine.connect() as conn:
        task = await conn.run_sync(service.get, principal.account_id, request.path_params["task_id"])
    if task is None:
        raise not_found(f"No task {request.path_params['task_id']!r} for this API key's account.", "task_not_found")
    return JSONResponse(task)


routes = [
    Route("/v1/images/generations", create_generation, methods=["POST"]),
    Route("/v1/tasks/{task_id}", get_task, methods=["GET"]),
]
