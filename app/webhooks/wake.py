"""Waking a worker to deliver a task's webhook event, after the commit that queued it.

The event's `webhook_deliveries` row is the source of truth; a wake-up is one message
naming it. Routes (cancel, redeliver) and workers (a task that ended) call `deliver_soon`
after their commit; if the publish fails, the sweep sends the wake-up later.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from app.core.broker import Publish
from app.webhooks import service

log = logging.getLogger(__name__)


def deliver_soon(engine: Engine, publish: Publish, task_id: str) -> None:
    """Publish a wake-up for the task's due deliveries and mark them; never raises."""
    try:
        service.dispatch(engine, publish, task_id=task_id)
    except Exception:
        log.exception("could not wake a worker for the webhook of %s; the sweep will", task_id)
