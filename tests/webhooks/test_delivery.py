"""Webhooks end to end: a real worker process delivers signed events to a loopback receiver."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from sqlalchemy import select, update
from standardwebhooks import Webhook, WebhookVerificationError

from app.core.models import Account, WebhookAttempt, WebhookDelivery
from tests.conftest import wait_for_task


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def submit(client, account, receiver, name: str, **body) -> str:
    body = {"model": "local-image", "prompt": unique("a lighthouse"), "webhook_url": receiver.url(name), **body}
    r = client.post("/v1/images/generations", headers=account.headers, json=body)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def deliveries(client, account, task_id: str, settled: bool = True, timeout: float = 20.0) -> list[dict]:
    """GET /v1/tasks/{id}/webhooks, waiting (with `settled`) until no delivery is still pending."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/tasks/{task_id}/webhooks", headers=account.headers)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        if not settled or (data and all(d["status"] != "pending" for d in data)):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"webhook of {task_id} still pending: {data}")
        time.sleep(0.1)


def test_completed_task_posts_the_signed_task_json(client, worker, account, receiver):
    task_id = submit(client, account, receiver, "completed")
    task = wait_for_task(client, account.headers, task_id)
    [request] = receiver.wait_for("completed")
    secret = client.get("/v1/webhooks/secret", headers=account.headers).json()["secret"]
    assert secret.startswith("whsec_")

    event = Webhook(secret).verify(request.body, request.headers)
    assert event["type"] == "task.completed"
    assert event["data"] == task == client.get(f"/v1/tasks/{task_id}", headers=account.headers).json()
    assert event["data"]["result"]["urls"]
    assert event["timestamp"] == task["finished_at"]
    assert request.headers["content-type"] == "application/json"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 30
    assert request.headers["webhook-id"].startswith("msg_")
    with pytest.raises(WebhookVerificationError):  # another account's secret does not verify it
        Webhook("whsec_" + "A" * 43 + "=").verify(request.body, request.headers)

    [delivery] = deliveries(client, account, task_id)
    assert delivery["id"] == request.headers["webhook-id"]
    assert delivery["status"] == "delivered" and delivery["event_type"] == "task.completed"
    assert delivery["url"] == receiver.url("completed")
    [attempt] = delivery["attempts"]
    assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["duration_ms"] >= 0


def test_failed_task_event_says_refunded(client, worker, account, receiver):
    task_id = submit(client, account, receiver, "failed", model="gpt-image-2", prompt=unique("[status:400] x"))
    task = wait_for_task(client, account.headers, task_id)
    assert task["status"] == "failed"
    [request] = receiver.wait_for("failed")
    event = json.loads(request.body)
    assert event["type"] == "task.failed"
    assert event["data"]["refunded"] is True and event["data"]["error"]["code"]


def test_retries_keep_the_webhook_id_until_a_2xx(client, worker, account, receiver):
    receiver.script("flaky", [500, 503, 204])
    task_id = submit(client, account, receiver, "flaky")
    got = receiver.wait_for("flaky", 3)
    assert len({r.headers["webhook-id"] for r in got}) == 1
    assert len({r.body for r in got}) == 1
    # The schedule is 0.3 s, 0.6 s (±20%): the retries come on it, not at once.
    assert got[1].at - got[0].at >= 0.2 and got[2].at - got[1].at >= 0.45
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "delivered" and delivery["attempt_count"] == 3
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 204]
    time.sleep(1.2)  # and nothing more once delivered
    assert len(receiver.received("flaky")) == 3


def test_410_stops_retries(client, worker, account, receiver):
    receiver.script("gone", [410])
    task_id = submit(client, account, receiver, "gone")
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "failed" and [a["status_code"] for a in delivery["attempts"]] == [410]
    time.sleep(1.0)
    assert len(receiver.received("gone")) == 1


def test_schedule_used_up_then_redeliver_sends_the_same_event_again(client, worker, account, receiver):
    receiver.script("down", [500])
    task_id = submit(client, account, receiver, "down")
    [delivery] = deliveries(client, account, task_id)
    # One attempt, then one per step of the test schedule (0.3, 0.6, 1 s).
    assert delivery["status"] == "failed" and delivery["attempt_count"] == 4
    assert [a["status_code"] for a in delivery["attempts"]] == [500] * 4
    first = receiver.received("down")

    receiver.script("down", [200])
    r = client.post(f"/v1/tasks/{task_id}/webhooks/redeliver", headers=account.headers)
    assert r.status_code == 202, r.text
    assert r.json()["id"] == delivery["id"] and r.json()["status"] == "pending"
    got = receiver.wait_for("down", 5)
    assert got[-1].headers["webhook-id"] == first[0].headers["webhook-id"]
    assert got[-1].body == first[0].body
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "delivered"
    assert [a["status_code"] for a in delivery["attempts"]] == [500] * 4 + [200]


def test_redirects_are_not_followed(client, worker, account, receiver):
    receiver.script("moved", [("redirect", receiver.url("moved-target"))])
    task_id = submit(client, account, receiver, "moved")
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "failed"
    assert {a["status_code"] for a in delivery["attempts"]} == {302}
    assert receiver.received("moved-target") == []


def test_a_receiver_slower_than_the_timeout_is_retried(client, worker, account, receiver):
    receiver.script("slow", [("sleep", 4, 200), 200])  # the test timeout is 3 s
    task_id = submit(client, account, receiver, "slow")
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "delivered"
    first, second = delivery["attempts"]
    assert first["status_code"] is None and "timeout" in first["error"]
    assert 2500 <= first["duration_ms"] < 4500
    assert second["status_code"] == 200


def test_an_unreachable_receiver_is_recorded_and_retried(client, worker, account, receiver):
    from tests.servers import free_port

    r = client.post("/v1/images/generations", headers=account.headers, json={
        "model": "local-image", "prompt": unique("nobody listens"),
        "webhook_url": f"http://127.0.0.1:{free_port()}/hook"})
    task_id = r.json()["task_id"]
    [delivery] = deliveries(client, account, task_id)
    assert delivery["status"] == "failed" and len(delivery["attempts"]) == 4
    assert all(a["status_code"] is None and "ConnectError" in a["error"] for a in delivery["attempts"])


def test_rotation_signs_with_both_secrets_during_the_grace_period(client, worker, make_account, receiver, engine):
    account = make_account()
    old = client.get("/v1/webhooks/secret", headers=account.headers).json()
    assert old["previous_secret_expires_at"] is None
    r = client.post("/v1/webhooks/secret/rotate", headers=account.headers)
    assert r.status_code == 200
    new = r.json()
    assert new["secret"] != old["secret"] and new["previous_secret_expires_at"]
    assert client.get("/v1/webhooks/secret", headers=account.headers).json()["secret"] == new["secret"]

    submit(client, account, receiver, "rotated")
    [request] = receiver.wait_for("rotated")
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (old["secret"], new["secret"]):  # receivers on either secret verify it
        Webhook(secret).verify(request.body, request.headers)

    with engine.begin() as conn:  # the grace period ends
        conn.execute(update(Account).where(Account.id == account.id)
                     .values(previous_secret_expires_at=Account.created_at))
    submit(client, account, receiver, "rotated-later")
    [request] = receiver.wait_for("rotated-later")
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    Webhook(new["secret"]).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old["secret"]).verify(request.body, request.headers)


def test_no_webhook_url_means_no_delivery(client, worker, account):
    r = client.post("/v1/images/generations", headers=account.headers,
                    json={"model": "local-image", "prompt": unique("quiet")})
    task_id = r.json()["task_id"]
    wait_for_task(client, account.headers, task_id)
    assert client.get(f"/v1/tasks/{task_id}/webhooks", headers=account.headers).json()["data"] == []
    r = client.post(f"/v1/tasks/{task_id}/webhooks/redeliver", headers=account.headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_webhook_url"


def test_webhook_routes_are_per_account(client, worker, make_account, receiver):
    owner, other = make_account(), make_account()
    task_id = submit(client, owner, receiver, "owned")
    wait_for_task(client, owner.headers, task_id)
    assert client.get(f"/v1/tasks/{task_id}/webhooks", headers=other.headers).status_code == 404
    assert client.post(f"/v1/tasks/{task_id}/webhooks/redeliver", headers=other.headers).status_code == 404
    assert client.get("/v1/webhooks/secret").status_code == 401
    assert (client.get("/v1/webhooks/secret", headers=owner.headers).json()["secret"]
            != client.get("/v1/webhooks/secret", headers=other.headers).json()["secret"])


def test_redeliver_of_an_unfinished_task_is_409(client, account, receiver, engine):
    from tests.taskrows import parked_task

    task_id = parked_task(engine, account, webhook_url=receiver.url("unfinished"))
    r = client.post(f"/v1/tasks/{task_id}/webhooks/redeliver", headers=account.headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_not_finished"


def test_attempts_are_stored(engine, client, worker, account, receiver):
    receiver.script("stored", [502, 200])
    task_id = submit(client, account, receiver, "stored")
    deliveries(client, account, task_id)
    with engine.connect() as conn:
        delivery = conn.execute(select(WebhookDelivery).where(WebhookDelivery.task_id == task_id)).one()
        attempts = conn.execute(select(WebhookAttempt.status_code)
                                .where(WebhookAttempt.delivery_id == delivery.id)
                                .order_by(WebhookAttempt.id)).scalars().all()
    assert attempts == [502, 200]
    assert delivery.delivered_at is not None and delivery.next_attempt_at is None
