"""Celery tasks. They take ids, re-check state in the database and are safe to run twice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from app.core import accounts, ledger
from app.core.models import utcnow
from app.images import lifecycle, outbox
from app.webhooks import service as webhook_service
from workers import events, generation, webhooks
from workers.celery_app import DELIVER, DISPATCH, GENERATE, SWEEP, celery, publisher
from workers.context import WorkerContext, get_context

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
        count = outbox.dispatch(ctx.engine, publisher(celery, GENERATE))
        total += count
        if count < outbox.BATCH:
            return total


def _deliver_later(delivery_id: str, countdown: float) -> None:
    celery.send_task(DELIVER, args=[delivery_id], countdown=countdown)


@celery.task(name=DELIVER, acks_late=True, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str:
    return webhooks.deliver(get_context(), delivery_id, publish_later=_deliver_later)


@celery.task(name=SWEEP, ignore_result=True)
def sweep() -> dict:
    """Periodic repair: tasks whose worker died, pending tasks whose wake-up was lost,
    webhook deliveries that are due (a retry, a lost wake-up, or a worker that died mid-attempt),
    LLM holds of web processes that died (their leases ran out), and dashboard sessions that ended
    more than a day ago.

    Each step stands alone: one that fails (logged) does not keep the others from running."""
    ctx = get_context()
    report: dict[str, Any] = {}

    def step(name: str, work: Callable[[], Any]) -> None:
        try:
            report[name] = work()
        except Exception:
            log.exception("sweep: %s failed; the next sweep tries again", name)
            report[name] = None

    step("holds", lambda: release_expired_holds(ctx.engine))
    step("recovered", lambda: _recover_tasks(ctx))
    step("dispatched", lambda: outbox.dispatch(ctx.engine, publisher(celery, GENERATE),
                                                 stale_after=ctx.settings.redispatch_after))
    step("webhooks", lambda: webhook_service.dispatch(ctx.engine, publisher(celery, DELIVER),
                                                      stale_after=ctx.settings.redispatch_after))
    step("sessions", lambda: delete_finished_sessions(ctx.engine))
    if any(report.values()):
        log.info("sweep: %s", report)
    return report


def _recover_tasks(ctx: WorkerContext) -> dict[str, int]:
    """Tasks whose worker died: requeued, or (out of attempts) failed and refunded."""
    with ctx.engine.begin() as conn:
        requeued, failed = lifecycle.recover_expired(conn, ctx.settings.task_max_attempts)
    for task_id in failed:
        events.task_ended(ctx, task_id)
    return {"requeued": len(requeued), "failed": len(failed)} if requeued or failed else {}


def release_expired_holds(engine: Engine, batches: int = 100) -> int:
    """Release expired LLM holds, a batch of accounts per transaction (locks held briefly)."""
    total = 0
    for _ in range(batches):
        with engine.begin() as conn:
            released = ledger.release_expired_holds(conn)
        total += released
        if not released:
            break
    return total


def delete_finished_sessions(engine: Engine) -> int:
    """Delete dashboard sessions that expired or were revoked over a day ago. (A day rather than at
    once: a sign-out just made can still be looked at; one indexed DELETE, usually of nothing.)"""
    with engine.begin() as conn:
        return accounts.delete_finished_sessions(conn, utcnow() - timedelta(days=1))
