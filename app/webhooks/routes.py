"""Webhook routes: the signing secret, and each task's deliveries. Delivery itself runs in workers."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.core import params
from app.core.auth import require
from app.core.db import run
from app.core.errors import APIError, not_found
from app.core.services import services
from app.webhooks import service
from app.webhooks.wake import deliver_soon


async def get_secret(request: Request) -> JSONResponse:
    principal = await require(request)
    return JSONResponse(await run(services(request).engine, service.secret_info, principal.account_id))


async def rotate_secret(request: Request) -> JSONResponse:
    principal = await require(request)
    state = services(request)
    return JSONResponse(await run(state.engine, service.rotate, principal.account_id,
                                  state.settings.webhook_secret_grace))


def _no_task(task_id: str) -> APIError:
    return not_found(f"No task {task_id!r} for this API key's account.", "task_not_found")


async def list_deliveries(request: Request) -> JSONResponse:
    principal = await require(request)
    task_id = request.path_params["task_id"]
    deliveries = None
    if params.is_id(task_id):
        async with services(request).engine.connect() as conn:
            deliveries = await conn.run_sync(service.list_for_task, principal.account_id, task_id)
    if deliveries is None:
        raise _no_task(task_id)
    return JSONResponse({"object": "list", "data": deliveries})


async def redeliver(request: Request) -> JSONResponse:
    principal = await require(request)
    state = services(request)
    task_id = request.path_params["task_id"]
    if not params.is_id(task_id):
        raise _no_task(task_id)
    delivery = await run(state.engine, service.redeliver, principal.account_id, task_id)
    if delivery is None:
        raise _no_task(task_id)
    await run_in_threadpool(deliver_soon, state.sync_engine, state.broker.deliver, task_id)
    return JSONResponse(delivery, status_code=202)


routes = [
    Route("/v1/webhooks/secret", get_secret, methods=["GET"]),
    Route("/v1/webhooks/secret/rotate", rotate_secret, methods=["POST"]),
    Route("/v1/tasks/{task_id}/webhooks", list_deliveries, methods=["GET"]),
    Route("/v1/tasks/{task_id}/webhooks/redeliver", redeliver, methods=["POST"]),
]
