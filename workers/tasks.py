"""Celery tasks. They take ids, re-check state in the database and are safe to run twice."""

from __future__ import annotations

import logging

from app import dispatch
from app.images import lifecycle
from workers import generation
from workers.celery_app import GENERATE, SWEEP, celery, publisher
from workers.context import get_context

log = logging.getLogger(__name__)


@celery.task(name=GENERATE, acks_late=True, ignore_result=True)
def generate_image(task_id: str) -> str:
    return generation.run(get_context(), task_id)


@celery.task(name=SWEEP, ignore_result=True)
def sweep() -> dict:
    """Periodic repair: tasks whose worker died, and pending tasks whose wake-up was lost."""
    ctx = get_context()
    with ctx.engine.begin() as conn:
        requeued, failed = lifecycle.recover_expired(conn, ctx.settings.task_max_attempts)
    for task_id in failed:
        from workers import events

        events.task_ended(ctx, task_id)
    dispatched = dispatch.dispatch(ctx.engine, publisher(celery), stale_after=ctx.settings.redispatch_after)
    if requeued or failed or dispatched:
        log.info("sweep: requeued %d, failed %d, dispatched %d", len(requeued), len(failed), dispatched)
    return {"requeued": len(requeued), "failed": len(failed), "dispatched": dispatched}
