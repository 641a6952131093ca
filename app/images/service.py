"""Submit and read image tasks. Sync functions on a `Connection`; the caller owns the transaction."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from sqlalchemy import Connection, Row, select, update
from sqlalchemy.exc import IntegrityError

from app.core import ledger, money
from app.core.auth import Principal
from app.core.errors import APIError
from app.core.models import ImageTask, utcnow
from app.core.pagination import decode_cursor, encode_cursor, older_than
from app.core.taskview import render
from app.images import lifecycle
from app.images.validation import GenerationRequest

IDEMPOTENCY_WINDOW = timedelta(hours=24)


def new_task_id() -> str:
    return "media_" + secrets.token_hex(12)


def submit(conn: Connection, principal: Principal, request: GenerationRequest, *,
           idempotency_key: str | None = None, request_hash: str | None = None) -> dict:
    """Debit the catalog price and create the pending task, in the caller's one transaction.

    Raises ledger.InsufficientBalance (nothing written) when the balance is short.
    The task row doubles as the outbox entry: the relay hands it to the broker
    after this transaction commits (dispatched_at is NULL until then).
    On PostgreSQL the debit, ledger row and task row are one statement (see
    ledger.charge_with_row). Elsewhere the row is written before the debit so that,
    with an idempotency key, a racing duplicate waits on the unique
    (account_id, idempotency_key) index, not on the balance.
    """
    task_id, charge, values = _new_task(principal, request, idempotency_key, request_hash)
    ledger.charge_with_row(conn, principal.account_id, charge, reference=task_id, note=_note(request),
                           table=ImageTask.__table__, values=values)
    return _accepted(task_id, request, charge)


async def submit_psycopg(connection: AsyncConnection[Any], principal: Principal, request: GenerationRequest) -> dict:
    """`submit` on PostgreSQL through a psycopg AsyncConnection in autocommit mode: one
    statement, one round trip, none of SQLAlchemy's per-execution work (the hot path)."""
    task_id, charge, values = _new_task(principal, request, None, None)
    await ledger.charge_with_row_psycopg(connection, principal.account_id, charge, reference=task_id,
                                         note=_note(request), table=ImageTask.__table__, values=values)
    return _accepted(task_id, request, charge)


def _new_task(principal: Principal, request: GenerationRequest, idempotency_key: str | None,
              request_hash: str | None) -> tuple[str, int, dict]:
    task_id = new_task_id()
    charge = request.model.prices[request.resolution]
    now = utcnow()
    values = dict(id=task_id, account_id=principal.account_id, api_key_id=principal.key_id, model=request.model.name,
                  prompt=request.prompt, size=request.size, resolution=request.resolution, n=request.n,
                  image_urls=request.image_urls, webhook_url=request.webhook_url, charge=charge, status="pending",
                  refunded=False, attempts=0, idempotency_key=idempotency_key, request_hash=request_hash,
                  created_at=now, updated_at=now)
    return task_id, charge, values


def _note(request: GenerationRequest) -> str:
    return f"image {request.model.name} {request.resolution}"


def _accepted(task_id: str, request: GenerationRequest, charge: int) -> dict:
    return {"task_id": task_id, "status": "pending", "model": request.model.name, "charge": money.render(charge)}


def _first_answer(task: Row[str, str, int, str | None, datetime], hashes: tuple[str, str]) -> dict:
    if task.request_hash not in hashes:
        raise APIError(422, "This Idempotency-Key was already used with a different request body. "
                            "Use a new key for a new request.", code="idempotency_key_reused",
                       param="Idempotency-Key")
    return {"task_id": task.id, "status": "pending", "model": task.model, "charge": money.render(task.charge)}


def submit_once(conn: Connection, principal: Principal, request: GenerationRequest, idempotency_key: str,
                hashes: tuple[str, str]) -> tuple[dict, bool]:
    """`submit` keyed by the account's `idempotency_key`: (answer, replayed).

    `hashes` is the validated request's fingerprint, which is stored, and its raw body's,
    which tasks stored before fingerprints were of validated requests still match. The same
    key and request within 24 hours returns the first answer without a second charge, also
    when the requests race: the unique index admits one row, and the loser (its savepoint
    rolled back, nothing charged) answers with the winner's task. The same key with another
    request is a 422. An older key is released and used afresh.
    """
    def existing() -> Row[str, str, int, str | None, datetime] | None:
        return conn.execute(
            select(ImageTask.id, ImageTask.model, ImageTask.charge, ImageTask.request_hash, ImageTask.created_at)
            .where(ImageTask.account_id == principal.account_id, ImageTask.idempotency_key == idempotency_key)
        ).first()

    found = existing()
    if found is not None:
        if found.created_at >= utcnow() - IDEMPOTENCY_WINDOW:
            return _first_answer(found, hashes), True
        conn.execute(update(ImageTask).where(ImageTask.id == found.id).values(idempotency_key=None))
    try:
        with conn.begin_nested():
            answer = submit(conn, principal, request, idempotency_key=idempotency_key, request_hash=hashes[0])
    except (IntegrityError, ledger.InsufficientBalance):
        # A racing duplicate committed first: we hit its row in the unique index, or (on
        # PostgreSQL, where the debit comes first in one statement) found the balance it spent.
        found = existing()
        if found is None:  # not our key's conflict after all
            raise
        return _first_answer(found, hashes), True
    return answer, False


def cancel(conn: Connection, account_id: int, task_id: str) -> dict | None:
    """pending | processing -> canceled, refunded once (its webhook event queued in the same
    transaction). None if not this account's task; 409 if it has already ended."""
    status = conn.execute(select(ImageTask.status).where(ImageTask.id == task_id,
                                                          ImageTask.account_id == account_id)).scalar()
    if status is None:
        return None
    if not lifecycle.cancel(conn, task_id):
        status = conn.execute(select(ImageTask.status).where(ImageTask.id == task_id)).scalar_one()
        raise APIError(409, f"Task {task_id} has already ended ({status}); only pending or processing "
                            "tasks can be canceled.", code="task_finished")
    return get(conn, account_id, task_id)


def list_tasks(conn: Connection, account_id: int, *, statuses: tuple[str, ...] = (), limit: int = 20,
               cursor: str | None = None) -> dict:
    """The account's tasks, newest first: {"data", "has_more", "next_cursor"} (pass it back as `cursor`)."""
    stmt = select(ImageTask).where(ImageTask.account_id == account_id)
    if statuses:
        stmt = stmt.where(ImageTask.status.in_(statuses))
    if cursor:
        stmt = stmt.where(older_than(decode_cursor(cursor), ImageTask.created_at, ImageTask.id))
    rows = conn.execute(stmt.order_by(ImageTask.created_at.desc(), ImageTask.id.desc())
                        .limit(limit + 1)).mappings().all()
    more = len(rows) > limit
    rows = rows[:limit]
    return {"object": "list", "data": [render(row) for row in rows], "has_more": more,
            "next_cursor": encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None}


def get(conn: Connection, account_id: int, task_id: str) -> dict | None:
    """The task as the API shows it, or None when it is not this account's."""
    row = conn.execute(
        select(ImageTask).where(ImageTask.id == task_id, ImageTask.account_id == account_id)
    ).mappings().first()
    return render(row) if row else None
