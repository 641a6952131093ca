"""Image task routes: parse, call one service function, render."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.core import ledger, outbound, params, taskview
from app.core.auth import Principal, require
from app.core.db import run, run_single
from app.core.errors import APIError, insufficient_balance, invalid, not_found
from app.core.services import Services, services
from app.images import service, validation
from app.webhooks.wake import deliver_soon

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024 * 1024
MAX_WAIT = 60
MAX_KEY_LENGTH = 255


async def read_json(request: Request, max_bytes: int = MAX_BODY) -> object:
    length = params.content_length(request.headers.get("content-length"))
    if length is not None and length > max_bytes:
        raise APIError(413, f"The request body is larger than {max_bytes // (1024 * 1024)} MiB.",
                       code="request_too_large")
    body = await request.body()
    if len(body) > max_bytes:
        raise APIError(413, "The request body is too large.", code="request_too_large")
    return params.json_body(body)


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise invalid("Idempotency-Key", f"'Idempotency-Key' must be 1 to {MAX_KEY_LENGTH} printable ASCII "
                                         "characters.")
    return key


def request_hash(request: validation.GenerationRequest) -> str:
    """The identity of a validated request for idempotency: what it asks for, however it was
    written (key order, whitespace, a default spelled out or left out, `null` for absent)."""
    canonical = json.dumps(validation.fingerprint(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def body_hash(body: object) -> str:
    """How a request was fingerprinted before `request_hash`: its raw JSON body. A replay of a
    task submitted then is still recognized (its row keeps this hash until it ages out)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def preferred_wait(request: Request) -> int | None:
    """Seconds from `Prefer: wait=N` (RFC 7240), at most MAX_WAIT; None without one."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].strip().partition("=")
            if name.strip().lower() == "wait":
                value = value.strip().strip('"')
                if not params.is_whole(value):
                    raise invalid("Prefer", "'Prefer: wait=N' takes a whole number of seconds.")
                return min(int(value), MAX_WAIT)
    return None


async def wait_until_finished(engine: AsyncEngine, account_id: int, task_id: str,
                              seconds: float) -> dict[str, Any] | None:
    """Poll the task row (one indexed read each time, short sleeps on the event loop) until it
    ends or `seconds` pass; the finished task, or None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    delay = 0.05
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 0.5)
        async with engine.connect() as conn:
            task = await conn.run_sync(service.get, account_id, task_id)
        if task is not None and task["status"] in taskview.TERMINAL:
            return task


async def submit(state: Services, principal: Principal, parsed: validation.GenerationRequest) -> dict[str, Any]:
    """The plain submit: on PostgreSQL one statement on the raw psycopg pool (the hot path)."""
    if state.pg_pool is not None:
        async with state.pg_pool.connection() as connection:
            return await service.submit_psycopg(connection, principal, parsed)
    return await run_single(state.engine, service.submit, principal, parsed)


async def create_generation(request: Request) -> JSONResponse:
    principal = await require(request)
    state = services(request)
    key = idempotency_key(request)
    wait = preferred_wait(request)
    body = await read_json(request)
    parsed, data_uris = validation.parse(body, state.catalog)
    if not state.settings.allow_private_urls:
        await outbound.check_public_urls(validation.outbound_urls(parsed))
    if data_uris:
        await run_in_threadpool(validation.verify_data_uris, parsed, data_uris, state.settings.max_reference_bytes)
    replayed = False
    try:
        if key is None:
            task = await submit(state, principal, parsed)
        else:
            task, replayed = await run(state.engine, service.submit_once, principal, parsed, key,
                                       (request_hash(parsed), body_hash(body)))
    except ledger.InsufficientBalance:
        raise insufficient_balance(
            f"Your balance is too low for {parsed.model.name} at {parsed.resolution}. Top up and try again."
        ) from None
    if not replayed:
        state.broker.wake()  # after the commit: a worker is woken to take the task
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait}"
        finished = await wait_until_finished(state.engine, principal.account_id, task["task_id"], wait)
        if finished is not None:
            return JSONResponse(finished, status_code=200, headers=headers)
    return JSONResponse(task, status_code=202, headers=headers)


async def list_tasks(request: Request) -> JSONResponse:
    principal = await require(request)
    query = request.query_params
    statuses = tuple(s.strip() for s in query.get("status", "").split(",") if s.strip())
    for status in statuses:
        if status not in taskview.STATUSES:
            raise invalid("status", f"'status' must be one or more of: {', '.join(taskview.STATUSES)}.")
    limit = params.optional_integer(query.get("limit"), "limit", 20, minimum=1, maximum=100)
    async with services(request).engine.connect() as conn:
        page = await conn.run_sync(service.list_tasks, principal.account_id, statuses=statuses, limit=limit,
                                   cursor=query.get("cursor") or None)
    return JSONResponse(page)


async def cancel_task(request: Request) -> JSONResponse:
    principal = await require(request)
    state = services(request)
    task_id = request.path_params["task_id"]
    task = await run(state.engine, service.cancel, principal.account_id, task_id) if params.is_id(task_id) else None
    if task is None:
        raise not_found(f"No task {task_id!r} for this API key's account.", "task_not_found")
    if task.get("webhook_url"):
        await run_in_threadpool(deliver_soon, state.sync_engine, state.broker.deliver, task_id)
    return JSONResponse(task)


async def get_task(request: Request) -> JSONResponse:
    principal = await require(request)
    task_id = request.path_params["task_id"]
    task = None
    if params.is_id(task_id):
        async with services(request).engine.connect() as conn:
            task = await conn.run_sync(service.get, principal.account_id, task_id)
    if task is None:
        raise not_found(f"No task {task_id!r} for this API key's account.", "task_not_found")
    return JSONResponse(task)


routes = [
    Route("/v1/images/generations", create_generation, methods=["POST"]),
    Route("/v1/tasks", list_tasks, methods=["GET"]),
    Route("/v1/tasks/{task_id}", get_task, methods=["GET"]),
    Route("/v1/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
]
