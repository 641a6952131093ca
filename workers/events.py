"""What happens when a task ends, besides its state: its webhook event goes out.

The event row itself was written with the terminal transition (app.images.lifecycle);
here, after that commit, a worker is woken to deliver it. If this wake-up is lost,
the sweep sends another: the row is the source of truth.
"""

from __future__ import annotations

import logging

from app.webhooks import service

log = logging.getLogger(__name__)


def task_ended(ctx, task_id: str) -> None:
    """Called once, by the winner of a task's terminal transition, after it committed."""
    from workers.celery_app import DELIVER, celery, publisher

    try:
        service.dispatch(ctx.engine, publisher(celery, DELIVER), task_id=task_id)
    except Exception:
        log.exception("could not wake a worker for the webhook of %s; the sweep will", task_id)
