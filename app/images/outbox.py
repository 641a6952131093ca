"""The outbox: pending tasks are handed to the broker after their transaction commits.

The task row is the outbox entry (`dispatched_at IS NULL`). A submit commits
and wakes the web process's `Relay`, which wakes a worker; the worker's
`dispatch` publishes one `images.generate` message per waiting task and marks
them. If anything dies in between, the periodic sweep dispatches the task
again, and the worker's claim makes a duplicate message harmless. No broker
publish sits on a request's critical path.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Callable, Iterable

from sqlalchemy import Connection, Engine, or_, select, update

from app.core.models import ImageTask, utcnow

log = logging.getLogger(__name__)
Publish = Callable[[list[str]], None]
BATCH = 500


def take_undispatched(conn: Connection, limit: int = BATCH, stale_after: float | None = None) -> list[str]:
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


def dispatch(engine: Engine, publish: Publish, *, limit: int = BATCH, stale_after: float | None = None) -> int:
    """One relay pass: publish and mark up to `limit` tasks in one transaction; returns the count."""
    with engine.begin() as conn:
        ids = take_undispatched(conn, limit, stale_after)
        if ids:
            publish(ids)
            mark_dispatched(conn, ids)
    return len(ids)


class Relay:
    """A thread in each web process that wakes a worker to dispatch, after submits commit.

    A submit only sets an event. This thread turns any number of those into one
    `maintenance.dispatch` message at most every `min_gap` seconds (a Celery publish
    costs about 1.5 ms of CPU here); the worker that
    takes it publishes the per-task messages (`dispatch` above). So a web process
    pays one broker publish per batch, not per task, and the publishing cost
    scales with the workers. A lost wake-up is made good by the sweep.
    """

    def __init__(self, wake_worker: Callable[[], None], min_gap: float = 0.05):
        self._wake_worker = wake_worker
        self._min_gap = min_gap
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mediagate-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._pending.set()

    def stop(self) -> None:
        self._stop.set()
        self._pending.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            self._pending.wait()
            if self._stop.is_set():
                return
            self._pending.clear()
            try:
                self._wake_worker()
            except Exception:  # the broker is away: the sweep dispatches what is waiting
                log.exception("could not wake a worker to dispatch")
                self._stop.wait(1.0)
            self._stop.wait(self._min_gap)
