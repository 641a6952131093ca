"""The worker's Celery app, configured from app.core.settings.

Production: MEDIAGATE_BROKER_URL (Redis). Embedded default: kombu's filesystem
transport in the data dir, so `mediagate serve` needs no other service. The broker
options, task names and publishing are app.core.broker's, shared with the web side;
what is here is only how a worker consumes. Messages carry ids (wake-ups); the
database is the source of truth.
"""

from __future__ import annotations

from celery import Celery

from app.core.broker import DELIVER, DISPATCH, GENERATE, SWEEP, celery_app, publisher
from app.core.settings import Settings, get_settings

__all__ = ["DELIVER", "DISPATCH", "GENERATE", "SWEEP", "celery", "make_celery", "publisher"]


def make_celery(settings: Settings) -> Celery:
    app = celery_app(settings)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Image calls wait 5-60 s on the network: threads, not one process per CPU.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.embedded_broker,
        worker_send_task_events=False,
        beat_schedule={"sweep": {"task": SWEEP, "schedule": settings.sweep_interval}},
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
    )
    return app


# A worker process reads its settings here, once. `celery -A workers.tasks` loads the tasks,
# which import this app and register themselves on it.
celery = make_celery(get_settings())
