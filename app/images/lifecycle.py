"""Task state changes, each a compare-and-set: only the winner of a transition acts on it.

    pending --claim--> processing --complete--> completed
       |                   |   \\--fail (refund)--> failed
       |                   \\--lease expired--> pending (attempts left) | failed (refund)
       \\--cancel (refund)--> canceled   (processing too)

A refund is written in the same transaction as the transition that causes it,
and the ledger's unique (kind, reference) makes a second refund impossible.
So is the task's webhook event (app.webhooks.service.record_event): a task that
ended always has its event queued, whatever crashes next.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import ColumnElement, Connection, select, update

from app.core import ledger
from app.core.models import ImageTask, utcnow
from app.webhooks import service as webhooks


def claim(conn: Connection, task_id: str, lease_seconds: int) -> dict | None:
    """pending -> processing for this worker; None if another worker has it or it has ended."""
    now = utcnow()
    won = conn.execute(
        update(ImageTask)
        .where(ImageTask.id == task_id, ImageTask.status == "pending")
        .values(status="processing", attempts=ImageTask.attempts + 1, started_at=now, updated_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds))
    ).rowcount == 1
    if not won:
        return None
    return dict(conn.execute(select(ImageTask).where(ImageTask.id == task_id)).mappings().one())


def _running(task_id: str, attempt: int | None) -> list[ColumnElement[bool]]:
    """The row of a processing task, and of this worker's claim of it when `attempt` is given:
    a worker whose lease ran out and whose task was claimed again can no longer end it."""
    conditions = [ImageTask.id == task_id, ImageTask.status == "processing"]
    if attempt is not None:
        conditions.append(ImageTask.attempts == attempt)
    return conditions


def extend_lease(conn: Connection, task_id: str, lease_seconds: int, attempt: int | None = None) -> bool:
    """Keep the claim alive; False when the task is no longer this worker's to run."""
    return conn.execute(
        update(ImageTask).where(*_running(task_id, attempt))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    ).rowcount == 1


def complete(conn: Connection, task_id: str, urls: list[str], attempt: int | None = None) -> bool:
    now = utcnow()
    won = conn.execute(
        update(ImageTask).where(*_running(task_id, attempt))
        .values(status="completed", result_urls=urls, updated_at=now, finished_at=now, lease_expires_at=None)
    ).rowcount == 1
    if won:
        webhooks.record_event(conn, task_id)
    return won


def _end_with_refund(conn: Connection, task_id: str, from_status: tuple[str, ...], status: str,
                     code: str, message: str, attempt: int | None = None) -> bool:
    now = utcnow()
    conditions = [ImageTask.id == task_id, ImageTask.status.in_(from_status)]
    if attempt is not None:
        conditions.append(ImageTask.attempts == attempt)
    row = conn.execute(
        update(ImageTask).where(*conditions)
        .values(status=status, error_code=code, error_message=message[:2000], refunded=True,
                updated_at=now, finished_at=now, lease_expires_at=None)
        .returning(ImageTask.account_id, ImageTask.charge)
    ).first()
    if row is None:
        return False
    ledger.refund(conn, row.account_id, row.charge, reference=task_id, note=f"{status}: {code}")
    webhooks.record_event(conn, task_id)
    return True


def fail(conn: Connection, task_id: str, code: str, message: str, attempt: int | None = None) -> bool:
    """processing -> failed, refunding the charge; False if the task was no longer processing
    (or, with `attempt`, no longer in that claim)."""
    return _end_with_refund(conn, task_id, ("processing",), "failed", code, message, attempt)


def cancel(conn: Connection, task_id: str) -> bool:
    """pending | processing -> canceled, refunding the charge."""
    return _end_with_refund(conn, task_id, ("pending", "processing"), "canceled", "canceled",
                            "The task was canceled.")


def recover_expired(conn: Connection, max_attempts: int, limit: int = 500) -> tuple[list[str], list[str]]:
    """Processing tasks whose worker died (lease ran out): back to pending if attempts are left,
    else failed and refunded. Returns (requeued ids, failed ids)."""
    now = utcnow()
    stmt = (select(ImageTask.id, ImageTask.attempts)
            .where(ImageTask.status == "processing", ImageTask.lease_expires_at < now)
            .limit(limit))
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    requeued, failed = [], []
    for task_id, attempts in conn.execute(stmt).all():
        if attempts < max_attempts:
            if conn.execute(
                update(ImageTask).where(ImageTask.id == task_id, ImageTask.status == "processing",
                                        ImageTask.lease_expires_at < now)
                .values(status="pending", dispatched_at=None, lease_expires_at=None, updated_at=now)
            ).rowcount:
                requeued.append(task_id)
        elif fail(conn, task_id, "worker_lost",
                  f"The worker running this task stopped {attempts} times; the charge was refunded."):
            failed.append(task_id)
    return requeued, failed
