"""The outbox: pending tasks are handed to the broker after their transaction commits.

The task row is the outbox entry (`dispatched_at IS NULL`). A submit commits
and wakes the web process's relay (app.core.broker.Relay), which wakes a worker; the worker's
`dispatch` publishes one `images.generate` message per waiting task and marks
them. If anything dies in between, the periodic sweep dispatches the task
again, and the worker's claim makes a duplicate message harmless. No broker
publish sits on a request's critical path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import ColumnElement, Connection, Engine, or_, select, update

from app.core.broker import Publish
from app.core.models import ImageTask, utcnow

log = logging.getLogger(__name__)
BATCH = 500


def take_undispatched(conn: Connection, limit: int = BATCH, stale_after: float | None = None) -> list[str]:
    """Lock and return pending task ids never dispatched (or, with `stale_after`, dispatched
    longer ago than that many seconds and still not claimed: a lost message)."""
    cond: ColumnElement[bool] = ImageTask.dispatched_at.is_(None)
    if stale_after is not None:
        cond = or_(cond, ImageTask.dispatched_at < utcnow() - timedelta(seconds=stale_after))
    stmt = (select(ImageTask.id).where(ImageTask.status == "pending", cond)
            .order_by(ImageTask.created_at).limit(limit))
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return list(conn.execute(stmt).scalars())


def mark_dispatched(conn: Connection, ids: Iterable[str]) -> None:
    ids = list(ids)
    if ids:
        conn.execute(update(ImageTask).where(ImageTask.id.in_(ids)).values(dispatched_at=utcnow()))


def dispatch(engine: Engine, publish: Publish, *, limit: int = BATCH, stale_after: float | None = None) -> int:
    """One relay pass: publish and mark up to `limit` tasks in one transaction; returns the count."""
    with engine.begin() as conn:
        ids = take_undispatched(conn, limit, stale_after)
        if ids:
            publish(ids)
            mark_dispatched(conn, ids)
    return len(ids)
