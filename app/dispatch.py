"""The outbox relay: hands pending tasks to the broker after their transaction commits.

The task row is the outbox entry (`dispatched_at IS NULL`). A submit commits,
then wakes the relay; the relay publishes a batch of wake-ups and marks them.
If the process dies between the two, the sweep (workers.tasks) dispatches the
task again later, and the worker's claim makes a duplicate message harmless.
The broker publish never sits on a request's critical path.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Callable, Iterable

from sqlalchemy import Connection, Engine, or_, select, update

from app.models import ImageTask, utcnow

log = logging.getLogger(__name__)
Publish = Callable[[list[str]], None]


def take_undispatched(conn: Connection, limit: int = 500, stale_after: float | None = None) -> list[str]:
    """Lock and return pending task ids never dispatched (or, with `stale_after`, dispatched
    longer ago than that many seconds and still not claimed: a lost message)."""
    cond = ImageTask.dispatched_at.is_(None)
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


def dispatch(engine: Engine, publish: Publish, *, limit: int = 500, stale_after: float | None = None) -> int:
    """One relay pass: publish and mark up to `limit` tasks in one transaction; returns the count."""
    with engine.begin() as conn:
        ids = take_undispatched(conn, limit, stale_after)
        if ids:
            publish(ids)
            mark_dispatched(conn, ids)
    return len(ids)


class Relay:
    """A thread in each web process: wakes on `wake()` (after a submit commits) or every `interval`."""

    def __init__(self, engine: Engine, publish: Publish, interval: float):
        self._engine = engine
        self._publish = publish
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mediagate-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                while dispatch(self._engine, self._publish) == 500 and not self._stop.is_set():
                    pass
            except Exception:  # the broker or database is away: the next pass or the sweep retries
                log.exception("relay pass failed")
                self._stop.wait(min(self._interval, 1.0))
