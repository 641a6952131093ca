"""The Celery app, configured from app.core.settings.

Production: MEDIAGATE_BROKER_URL (Redis). Embedded default: kombu's filesystem
transport in the data dir, so `mediagate serve` needs no other service.
The database is the source of truth; messages only carry task ids (wake-ups).
"""

from __future__ import annotations

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

from app.core.settings import Settings, get_settings

GENERATE = "images.generate"
DELIVER = "webhooks.deliver"
SWEEP = "maintenance.sweep"
DISPATCH = "maintenance.dispatch"

TRANSPORT_ALIASES.setdefault("mediagate-fs", "workers.embedded_broker:Transport")


def broker_options(settings: Settings) -> tuple[str, dict]:
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


def make_celery(settings: Settings) -> Celery:
    broker, transport_options = broker_options(settings)
    app = Celery("mediagate", broker=broker, set_as_current=False)
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=settings.queue,
        task_routes={GENERATE: {"queue": settings.queue}, DELIVER: {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        # Image calls wait 5-60 s on the network: threads, not one process per CPU.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.embedded_broker,
        worker_send_task_events=False,
        beat_schedule={"sweep": {"task": SWEEP, "schedule": settings.sweep_interval}},
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        timezone="UTC",
    )
    return app


def publisher(celery: Celery, name: str = GENERATE):
    """A publish(ids) callable for the outbox relays (tasks, and webhook deliveries with
    name=DELIVER): one producer for the whole batch."""

    def publish(ids: list[str]) -> None:
        with celery.producer_or_acquire() as producer:
            for task_id in ids:
                celery.send_task(name, args=[task_id], producer=producer)

    return publish


def dispatch_waker(celery: Celery):
    """A wake() callable for the web process's Relay: one `maintenance.dispatch` message."""

    def wake() -> None:
        celery.send_task(DISPATCH)

    return wake


celery = make_celery(get_settings())
celery.autodiscover_tasks(["workers"], related_name="tasks", force=True)
