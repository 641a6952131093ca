"""Submit and read image tasks. Sync functions on a `Connection`; the caller owns the transaction."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import Connection, insert, select

from app import ledger, money
from app.auth import Principal
from app.images.validation import GenerationRequest
from app.models import ImageTask, utcnow

TERMINAL = ("completed", "failed", "canceled")


def new_task_id() -> str:
    return "media_" + secrets.token_hex(12)


def submit(conn: Connection, principal: Principal, request: GenerationRequest) -> dict:
    """Debit the catalog price and create the pending task, in the caller's one transaction.

    Raises ledger.InsufficientBalance (nothing written) when the balance is short.
    The task row doubles as the outbox entry: the relay hands it to the broker
    after this transaction commits (dispatched_at is NULL until then).
    """
    task_id = new_task_id()
    charge = request.model.prices[request.resolution]
    ledger.charge(conn, principal.account_id, charge, reference=task_id,
                  note=f"image {request.model.name} {request.resolution}")
    now = utcnow()
    conn.execute(insert(ImageTask).values(
        id=task_id, account_id=principal.account_id, api_key_id=principal.key_id, model=request.model.name,
        prompt=request.prompt, size=request.size, resolution=request.resolution, n=request.n,
        image_urls=request.image_urls, webhook_url=request.webhook_url, charge=charge, status="pending",
        created_at=now, updated_at=now,
    ))
    return {"task_id": task_id, "status": "pending", "model": request.model.name, "charge": money.render(charge)}


def get(conn: Connection, account_id: int, task_id: str) -> dict | None:
    """The task as the API shows it, or None when it is not this account's."""
    row = conn.execute(
        select(ImageTask).where(ImageTask.id == task_id, ImageTask.account_id == account_id)
    ).mappings().first()
    return render(row) if row else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def render(task) -> dict:
    """The one JSON shape of a task: GET /v1/tasks/{id}, lists and webhook payloads."""
    body = {
        "task_id": task["id"],
        "status": task["status"],
        "model": task["model"],
        "charge": money.render(task["charge"]),
        "prompt": task["prompt"],
        "size": task["size"],
        "resolution": task["resolution"],
        "n": task["n"],
        "created_at": _iso(task["created_at"]),
        "updated_at": _iso(task["updated_at"]),
        "finished_at": _iso(task["finished_at"]),
        "refunded": bool(task["refunded"]),
    }
    if task["status"] == "completed":
        body["result"] = {"urls": list(task["result_urls"] or [])}
    if task["status"] in ("failed", "canceled"):
        body["error"] = {"code": task["error_code"], "message": task["error_message"]}
    if task["webhook_url"]:
        body["webhook_url"] = task["webhook_url"]
    return body
