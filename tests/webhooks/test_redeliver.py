"""POST /v1/tasks/{id}/webhooks/redeliver is rate-limited per task, in the database: none while an
attempt is due or in flight, and at most one every REDELIVERY_INTERVAL; 429 past it."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.core.models import WebhookDelivery, utcnow
from app.webhooks.service import REDELIVERY_INTERVAL
from tests.webhooks.test_delivery import deliveries, submit


def _redeliver(client, account, task_id: str):
    return client.post(f"/v1/tasks/{task_id}/webhooks/redeliver", headers=account.headers)


def _assert_limited(response) -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "redelivery_rate_limited" and error["type"] == "rate_limit_error"
    seconds = int(response.headers["retry-after"])
    assert seconds >= 1
    return seconds


def _delivered(client, account, receiver, name: str) -> tuple[str, str]:
    task_id = submit(client, account, receiver, name)
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "delivered"
    return task_id, delivery["id"]


def _age_last_redelivery(engine, delivery_id: str) -> None:
    """As if the last redelivery were longer ago than the interval."""
    with engine.begin() as conn:
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                     .values(redelivered_at=utcnow() - REDELIVERY_INTERVAL - timedelta(seconds=1)))


def test_a_hundred_redeliveries_at_once_send_one_request(client, worker, account, receiver, engine):
    task_id, delivery_id = _delivered(client, account, receiver, "burst")
    assert len(receiver.received("burst")) == 1
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: _redeliver(client, account, task_id), range(100)))
    accepted = [r for r in answers if r.status_code == 202]
    assert len(accepted) == 1, [r.status_code for r in answers]
    for response in answers:
        if response.status_code != 202:
            assert _assert_limited(response) <= REDELIVERY_INTERVAL.total_seconds() + 60
    receiver.wait_for("burst", 2)  # the one redelivery arrives (a worker sends it after the 202)
    deadline = time.monotonic() + 10
    while deliveries(client, account, task_id)[0]["status"] != "delivered":
        assert time.monotonic() < deadline, deliveries(client, account, task_id)
        time.sleep(0.05)
    time.sleep(1.0)  # nothing else is on its way
    assert len(receiver.received("burst")) == 2

    # Within the interval of that redelivery: refused, even though nothing is in flight any more.
    assert 1 <= _assert_limited(_redeliver(client, account, task_id)) <= REDELIVERY_INTERVAL.total_seconds()
    _age_last_redelivery(engine, delivery_id)  # past the interval: allowed again
    assert _redeliver(client, account, task_id).status_code == 202
    receiver.wait_for("burst", 3)


def test_no_redelivery_while_an_attempt_is_in_flight(client, worker, account, receiver):
    receiver.script("busy", [("sleep", 2, 200), 200])
    task_id = submit(client, account, receiver, "busy")
    receiver.wait_for("busy", 1)  # the first attempt has reached the receiver, which takes 2 s to answer
    seconds = _assert_limited(_redeliver(client, account, task_id))
    assert seconds >= 1  # (the attempt's lease is the longest it can take)
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "delivered" and delivery["attempt_count"] == 1
    assert len(receiver.received("busy")) == 1  # the refused redelivery sent nothing
    assert _redeliver(client, account, task_id).status_code == 202  # once it has ended, and never redelivered
    receiver.wait_for("busy", 2)


def test_a_retry_scheduled_for_later_may_be_brought_forward(client, worker, account, receiver, engine):
    task_id, delivery_id = _delivered(client, account, receiver, "later")
    later = utcnow() + timedelta(hours=1)
    with engine.begin() as conn:  # as a delivery whose next retry is an hour away
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                     .values(status="pending", next_attempt_at=later, dispatched_at=later, delivered_at=None))
    r = _redeliver(client, account, task_id)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending"
    receiver.wait_for("later", 2, timeout=10)
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "delivered"
    with engine.connect() as conn:
        redelivered_at = conn.execute(select(WebhookDelivery.redelivered_at)
                                      .where(WebhookDelivery.id == delivery_id)).scalar_one()
    assert redelivered_at is not None and abs((utcnow() - redelivered_at).total_seconds()) < 30


def test_a_due_attempt_waiting_for_a_worker_is_not_doubled(client, worker, account, receiver, engine):
    task_id, delivery_id = _delivered(client, account, receiver, "due")
    _age_last_redelivery(engine, delivery_id)
    woken = utcnow() + timedelta(hours=1)
    with engine.begin() as conn:  # due now, its wake-up sent (and not yet taken by a worker)
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                     .values(status="pending", next_attempt_at=utcnow() - timedelta(seconds=1), dispatched_at=woken,
                             delivered_at=None))
    _assert_limited(_redeliver(client, account, task_id))
    time.sleep(0.5)
    assert len(receiver.received("due")) == 1


def test_the_first_event_made_by_a_redelivery_counts_too(client, account, receiver, engine):
    from tests.taskrows import parked_task

    task_id = parked_task(engine, account, webhook_url=receiver.url("made"), status="completed")
    first = _redeliver(client, account, task_id)  # the task has no delivery row yet: redeliver makes it
    assert first.status_code == 202, first.text
    _assert_limited(_redeliver(client, account, task_id))


@pytest.mark.skipif(not os.environ.get("MEDIAGATE_TEST_DATABASE_URL"), reason="PostgreSQL's row locks")
def test_a_wake_up_for_one_task_waits_for_a_row_another_transaction_holds(account, engine):
    # 100 redeliveries at once: the losers' UPDATEs keep the row locked a moment after their
    # condition fails, and the winner's wake-up must not skip it (it then waited for the sweep).
    import threading

    from app.webhooks import service
    from tests.taskrows import parked_task

    task_id = parked_task(engine, account, webhook_url="http://127.0.0.1:9/hook", status="completed")
    with engine.begin() as conn:
        delivery_id = service.record_event(conn, task_id)
    published: list[list[str]] = []
    with engine.connect() as blocker:
        transaction = blocker.begin()
        blocker.execute(select(WebhookDelivery.id).where(WebhookDelivery.id == delivery_id).with_for_update())
        woken = threading.Thread(target=lambda: service.dispatch(engine, published.append, task_id=task_id))
        woken.start()
        time.sleep(0.5)
        assert published == []  # waiting for the row, not past it
        transaction.rollback()
    woken.join(10)
    assert published == [[delivery_id]]
