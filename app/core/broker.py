"""The broker port: how a process wakes workers. Celery is behind it; messages carry ids only.

The database is the source of truth: a message is a wake-up that says "look at this row".
Losing one loses nothing (the sweep sends another), and a duplicate is harmless (workers
claim by compare-and-set). The web process publishes through a `Broker` made in its
lifespan; the worker's Celery app (workers.celery_app) uses the same names and options.

Celery processes load `workers.tasks` (`celery -A workers.tasks`), which imports the app
and registers the tasks on it: no module of the app names the tasks' module back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

from app.core.settings import Settings

log = logging.getLogger(__name__)

# The Celery task names: stable, dotted, part of what a deployment's queue holds.
GENERATE = "images.generate"
DELIVER = "webhooks.deliver"
SWEEP = "maintenance.sweep"
DISPATCH = "maintenance.dispatch"

# The embedded default's transport: a folder in the data dir (app/core/embedded_broker.py).
TRANSPORT_ALIASES.setdefault("mediagate-fs", "app.core.embedded_broker:Transport")

Publish = Callable[[list[str]], None]


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The broker URL and transport options: Redis in production, a folder when embedded."""
    if settings.broker_url:
        # A worker that dies holding a message gives it back after this long; the lease sweep
        # usually acts first. Keep it above the longest task.
        return settings.broker_url, {"visibility_timeout": 3 * 3600}
    folder = settings.data_dir / "broker"
    (folder / "queue").mkdir(parents=True, exist_ok=True)
    return "mediagate-fs://", {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "polling_interval": 0.05,
    }


def celery_app(settings: Settings) -> Celery:
    """A Celery app on the deployment's broker and queue, configured from `settings` alone."""
    broker, transport_options = broker_options(settings)
    app = Celery("mediagate", broker=broker, set_as_current=False)
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_routes={GENERATE: {"queue": settings.queue}, DELIVER: {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
    )
    return app


def publisher(celery: Celery, name: str) -> Publish:
    """A publish(ids) callable: one message `name(id)` per id, on one producer for the batch."""

    def publish(ids: list[str]) -> None:
        with celery.producer_or_acquire() as producer:
            for item_id in ids:
                celery.send_task(name, args=[item_id], producer=producer)

    return publish


class Broker:
    """What the web process sends workers: task wake-ups through its relay, webhook wake-ups."""

    def __init__(self, settings: Settings):
        self.celery = celery_app(settings)
        self.deliver: Publish = publisher(self.celery, DELIVER)
        self.relay = Relay(self.wake_dispatcher)

    def start(self) -> None:
        self.relay.start()

    def wake(self) -> None:
        """After a submit commits: the relay wakes a worker to dispatch (at most one message per gap)."""
        self.relay.wake()

    def wake_dispatcher(self) -> None:
        """One `maintenance.dispatch` message: the worker that takes it publishes the waiting tasks."""
        self.celery.send_task(DISPATCH)

    def check(self) -> None:
        """Raise unless the broker answers (GET /healthz)."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def stop(self) -> None:
        self.relay.stop()
        self.celery.close()  # its producer pool


class Relay:
    """A thread in each web process that wakes a worker to dispatch, after submits commit.

    A submit only sets an event. This thread turns any number of those into one
    `maintenance.dispatch` message at most every `min_gap` seconds (a Celery publish costs
    about a millisecond and a half of CPU); the worker that takes it publishes the per-task
    messages (app.images.outbox.dispatch). So a web process pays one broker publish per
    batch, not per task, and the publishing cost scales with the workers. A lost wake-up is
    made good by the sweep.
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
