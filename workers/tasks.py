"""Celery tasks. They take ids, re-check state in the database and are safe to run twice."""

from __future__ import annotations

import logging

from app import dispatch
from app.images import lifecycle
from app.webhooks import service as webhook_service
from workers import generation, webhooks
from workers.celery_app import DELIVER, DISPATCH, GENERATE, SWEEP, celery, publisher
from workers.context import get_context

log = logging.getLogger(__name__)


@celery.task(name=GENERATE, acks_late=True, ignore_result=True)
def generate_image(task_id: str) -> str:
    return generation.run(get_context(), task_id)


@celery.task(name=DISPATCH, ignore_result=True)
def dispatch_pending() -> int:
    """Woken by a web process after submits: publish the waiting tasks, in batches."""
    ctx = get_context()
    total = 0
    while True:
        count = dispatch.dispatch(ctx.engine, publisher(celery))
        total += count
        if count < dispatch.BATCH:
            return total


def _deliver_later(delivery_id: str, countdown: float) -> None:
    celery.send_task(DELIVER, args=[delivery_id], countdown=countdown)


@celery.task(name=DELIVER, acks_late=True, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str:
    return webhooks.deliver(get_context(), delivery_id, publish_later=_deliver_later)


@celery.task(name=SWEEP, ignore_result=True)
def sweep() -> dict:
    """Periodic repair: tasks whose worker died, pending tasks whose wake-up was lost, and
    webhook deliveries that are due (a retry, a lost wake-up, or a worker that died mid-attempt)."""
    ctx = get_context()
    with ctx.engine.begin() as conn:
        requeued, failed = lifecycle.recover_expired(conn, ctx.settings.task_max_attempts)
    for task_id in failed:
        from workers import events

        events.task_ended(ctx, task_id)
    dispatched = dispatch.dispatch(ctx.engine, publisher(celery), stale_after=ctx.settings.redispatch_after)
    webhooks_due = webhook_service.dispatch(ctx.engine, publisher(celery, DELIVER),
                                            stale_after=ctx.settings.redispatch_after)
    if requeued or failed or dispatched or webhooks_due:
        log.info("sweep: requeued %d, failed %d, dispatched %d, webhooks %d",
                 len(requeued), len(failed), dispatched, webhooks_due)
    return {"requeued": len(requeued), "failed": len(failed), "dispatched": dispatched,
            "webhooks": webhooks_due}
