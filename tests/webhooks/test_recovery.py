"""Nothing lost: the sweep delivers webhooks whose wake-up was lost or whose worker died."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import select, update

from app.core.models import WebhookDelivery, utcnow
from app.images import lifecycle
from app.webhooks import service
from tests.taskrows import parked_task


def _ended_silently(engine, account, url: str) -> str:
    """A task canceled with its event written but no worker woken (as if the process died then)."""
    task_id = parked_task(engine, account, webhook_url=url)
    with engine.begin() as conn:
        assert lifecycle.cancel(conn, task_id)
        return conn.execute(select(WebhookDelivery.id).where(WebhookDelivery.task_id == task_id)).scalar_one()


def _delivery(engine, delivery_id: str):
    with engine.connect() as conn:
        return conn.execute(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)).one()


def _sweep() -> dict:
    from workers.tasks import sweep

    return sweep()  # runs here, publishing wake-ups to the test worker


def test_the_event_is_written_with_the_terminal_transition(engine, account, receiver):
    delivery_id = _ended_silently(engine, account, receiver.url("written"))
    row = _delivery(engine, delivery_id)
    assert row.status == "pending" and row.event_type == "task.canceled"
    assert row.dispatched_at is None and row.next_attempt_at <= utcnow()


def test_sweep_sends_a_lost_wake_up(engine, worker, account, receiver):
    delivery_id = _ended_silently(engine, account, receiver.url("lost-wakeup"))
    assert _sweep()["webhooks"] >= 1
    [request] = receiver.wait_for("lost-wakeup")
    assert request.headers["webhook-id"] == delivery_id


def test_sweep_resends_a_wake_up_that_never_arrived(engine, worker, account, receiver, settings):
    delivery_id = _ended_silently(engine, account, receiver.url("stale-wakeup"))
    with engine.begin() as conn:  # dispatched, then the broker lost it (Redis flushed)
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(
            dispatched_at=utcnow() - timedelta(seconds=settings.redispatch_after - 5)))
    _sweep()
    assert _delivery(engine, delivery_id).status == "pending"  # not overdue yet: left alone
    with engine.begin() as conn:
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(
            dispatched_at=utcnow() - timedelta(seconds=settings.redispatch_after + 5)))
    _sweep()
    receiver.wait_for("stale-wakeup")


def test_sweep_takes_over_from_a_worker_that_died_mid_attempt(engine, worker, account, receiver):
    delivery_id = _ended_silently(engine, account, receiver.url("died"))
    with engine.begin() as conn:  # a worker claims it, then is killed before it records anything
        assert service.claim(conn, delivery_id, lease_seconds=0.5) is not None
    _sweep()
    assert receiver.received("died") == []  # its lease still holds
    with engine.begin() as conn:
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                     .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    _sweep()
    receiver.wait_for("died")
    assert _delivery(engine, delivery_id).status in ("pending", "delivered")


def test_a_due_retry_is_sent_by_the_sweep(engine, worker, account, receiver):
    delivery_id = _ended_silently(engine, account, receiver.url("later"))
    with engine.begin() as conn:  # a retry hours away: no delayed message, only the row says when
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                     .values(next_attempt_at=utcnow() + timedelta(hours=2), attempt_count=3))
    _sweep()
    assert receiver.received("later") == []
    with engine.begin() as conn:
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                     .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    _sweep()
    receiver.wait_for("later")


def test_a_delivery_woken_twice_is_attempted_once(engine, account, receiver):
    from workers import webhooks
    from workers.context import get_context

    receiver.script("twice", [("sleep", 0.5, 200)])
    delivery_id = _ended_silently(engine, account, receiver.url("twice"))
    with engine.begin() as conn:  # keep the test worker's hands off: this test runs both here
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                     .values(dispatched_at=utcnow()))
    ctx = get_context()
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(webhooks.deliver(ctx, delivery_id)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["delivered", "skipped", "skipped", "skipped"]
    assert len(receiver.received("twice")) == 1
    assert webhooks.deliver(ctx, delivery_id) == "skipped"  # delivered stays delivered
