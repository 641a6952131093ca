"""Webhook events, secrets and delivery state. Sync functions on a `Connection`; the caller commits.

A delivery's whole state lives in its `webhook_deliveries` row; the broker only
carries wake-ups, and the sweep re-sends any that were lost:

    pending (next_attempt_at) --claim--> attempt in flight (lease) --2xx--> delivered
       ^                                        |--410 or schedule used up--> failed
       '------------ retry at the next step of the schedule, with jitter -----'

`dispatched_at` is when the current wake-up is expected to arrive (now, or the
retry time for a delayed one); a due delivery whose wake-up is older than
`stale_after` is dispatched again. A claim clears it and takes a lease, so a
worker that dies mid-attempt leaves a row the sweep picks up once the lease ends.
"""

from __future__ import annotations

import json
import math
import random
import secrets as random_ids
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Row, and_, insert, or_, select, update

from app.core import taskview
from app.core.errors import APIError
from app.core.models import Account, ImageTask, WebhookAttempt, WebhookDelivery, iso, utcnow
from app.webhooks import signing

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
JITTER = 0.2  # each retry delay is scaled by a random factor in [0.8, 1.2]
# Redeliveries of one task's event are at least this far apart (6 a minute), and none while an
# attempt is due or in flight: a client looping on redeliver cannot turn the gateway on its receiver.
REDELIVERY_INTERVAL = timedelta(seconds=10)


def new_delivery_id() -> str:
    return "msg_" + random_ids.token_urlsafe(18)


# Secrets ---------------------------------------------------------------------------------------

def current_secret(conn: Connection, account_id: int) -> str:
    """The account's signing secret, made on first use (concurrent first uses agree on one)."""
    value = conn.execute(select(Account.webhook_secret).where(Account.id == account_id)).scalar_one()
    if value is None:
        conn.execute(update(Account).where(Account.id == account_id, Account.webhook_secret.is_(None))
                     .values(webhook_secret=signing.new_secret()))
        value = conn.execute(select(Account.webhook_secret).where(Account.id == account_id)).scalar_one()
    assert value is not None, "set just above, by this transaction or a concurrent first use"
    return value


def secret_info(conn: Connection, account_id: int) -> dict:
    """GET /v1/webhooks/secret: the current secret and when a rotated-out one stops being used."""
    secret = current_secret(conn, account_id)
    expires = conn.execute(select(Account.previous_webhook_secret, Account.previous_secret_expires_at)
                           .where(Account.id == account_id)).one()
    active = expires[0] is not None and expires[1] is not None and expires[1] > utcnow()
    return {"secret": secret, "previous_secret_expires_at": iso(expires[1]) if active else None}


def rotate(conn: Connection, account_id: int, grace_seconds: int) -> dict:
    """A new secret; the old one keeps signing (beside the new) for `grace_seconds`."""
    old = current_secret(conn, account_id)
    expires = utcnow() + timedelta(seconds=grace_seconds)
    conn.execute(update(Account).where(Account.id == account_id).values(
        webhook_secret=signing.new_secret(), previous_webhook_secret=old, previous_secret_expires_at=expires))
    return secret_info(conn, account_id)


def signing_secrets(conn: Connection, account_id: int) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and the previous one in its grace."""
    current = current_secret(conn, account_id)
    previous, expires = conn.execute(select(Account.previous_webhook_secret, Account.previous_secret_expires_at)
                                     .where(Account.id == account_id)).one()
    if previous and expires is not None and expires > utcnow():
        return [current, previous]
    return [current]


# Events ----------------------------------------------------------------------------------------

def record_event(conn: Connection, task_id: str) -> str | None:
    """Write the task's terminal event for delivery, in the transaction that ended the task.

    Returns the delivery id (the webhook-id), or None when the task has no webhook_url.
    Because it commits with the transition, a crash right after cannot lose the event.
    """
    task = conn.execute(select(ImageTask).where(ImageTask.id == task_id)).mappings().one()
    if not task["webhook_url"]:
        return None
    now = utcnow()
    event_type = f"task.{task['status']}"
    payload = json.dumps({"type": event_type, "timestamp": iso(task["finished_at"] or now),
                          "data": taskview.render(task)}, ensure_ascii=False, separators=(",", ":"))
    delivery_id = new_delivery_id()
    conn.execute(insert(WebhookDelivery).values(
        id=delivery_id, task_id=task_id, account_id=task["account_id"], url=task["webhook_url"],
        event_type=event_type, payload=payload, status=PENDING, attempt_count=0, next_attempt_at=now,
        created_at=now))
    return delivery_id


# Dispatch (wake-ups) ---------------------------------------------------------------------------

def take_due(conn: Connection, *, limit: int = 500, stale_after: float | None = None,
             task_id: str | None = None) -> list[str]:
    """Lock and return due deliveries that need a wake-up: never dispatched since they became due,
    or (with `stale_after`) dispatched longer ago than that and still not attempted."""
    now = utcnow()
    wake: ColumnElement[bool] = WebhookDelivery.dispatched_at.is_(None)
    if stale_after is not None:
        wake = or_(wake, WebhookDelivery.dispatched_at < now - timedelta(seconds=stale_after))
    stmt = (select(WebhookDelivery.id)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now, wake,
                   or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < now))
            .order_by(WebhookDelivery.next_attempt_at).limit(limit))
    if task_id is not None:
        stmt = stmt.where(WebhookDelivery.task_id == task_id)
    if conn.dialect.name == "postgresql":
        # The sweep's scan skips rows another transaction has locked: a sweeper beside it takes
        # them. A wake-up for one task waits instead: the lock may be a redelivery refused a
        # moment ago (PostgreSQL keeps a row locked by an UPDATE whose condition failed on
        # recheck until that transaction ends), and skipping would lose the wake-up until the sweep.
        stmt = stmt.with_for_update(skip_locked=task_id is None)
        if task_id is not None:  # ... for a moment: a lock held longer is the sweep's to work around
            conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
    return list(conn.execute(stmt).scalars())


def dispatch(engine: Engine, publish: Callable[[list[str]], None], *, limit: int = 500,
             stale_after: float | None = None, task_id: str | None = None) -> int:
    """One pass: publish wake-ups for due deliveries and mark them, in one transaction."""
    with engine.begin() as conn:
        ids = take_due(conn, limit=limit, stale_after=stale_after, task_id=task_id)
        if ids:
            publish(ids)
            conn.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(dispatched_at=utcnow()))
    return len(ids)


# Attempts --------------------------------------------------------------------------------------

def claim(conn: Connection, delivery_id: str, lease_seconds: float) -> dict | None:
    """Take a due delivery for one attempt; None if it is not due, in flight elsewhere, or finished.

    Returns the row plus `lease` (the token `finish_attempt` checks) and the signing `secrets`.
    """
    now = utcnow()
    lease = now + timedelta(seconds=lease_seconds)
    won = conn.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING,
               WebhookDelivery.next_attempt_at <= now + timedelta(seconds=1),  # an ETA may fire a hair early
               or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < now))
        .values(lease_expires_at=lease, dispatched_at=None)
    ).rowcount == 1
    if not won:
        return None
    row = dict(conn.execute(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)).mappings().one())
    row["lease"] = row["lease_expires_at"]
    row["secrets"] = signing_secrets(conn, row["account_id"])
    return row


def retry_delay(schedule: tuple[float, ...], attempts_made: int) -> float | None:
    """Seconds until the next attempt after `attempts_made` failures; None when the schedule is used up."""
    if attempts_made > len(schedule):
        return None
    return schedule[attempts_made - 1] * random.uniform(1 - JITTER, 1 + JITTER)


def finish_attempt(conn: Connection, delivery: dict, *, status_code: int | None, error: str | None,
                   duration_ms: int, schedule: tuple[float, ...], wake_within: float) -> tuple[str, datetime | None]:
    """Record one attempt and move the delivery on. Returns (outcome, when a wake-up is due):
    outcome is "delivered", "gone" (410: stop), "retry", "exhausted" or "lost" (the lease was
    taken over meanwhile; the attempt is recorded, the state left to the new holder). A retry
    within `wake_within` seconds gets a delayed wake-up from the caller; later ones, the sweep's."""
    now = utcnow()
    conn.execute(insert(WebhookAttempt).values(
        delivery_id=delivery["id"], attempted_at=now, status_code=status_code,
        error=(error or None) and error[:500], duration_ms=duration_ms))
    attempts = delivery["attempt_count"] + 1
    values: dict = {"attempt_count": attempts, "lease_expires_at": None}
    wake_at = None
    if status_code is not None and 200 <= status_code < 300 and not error:
        outcome = "delivered"
        values.update(status=DELIVERED, delivered_at=now, next_attempt_at=None)
    elif status_code == 410:
        outcome = "gone"
        values.update(status=FAILED, next_attempt_at=None)
    else:
        delay = retry_delay(schedule, attempts)
        if delay is None:
            outcome = "exhausted"
            values.update(status=FAILED, next_attempt_at=None)
        else:
            outcome = "retry"
            values["next_attempt_at"] = now + timedelta(seconds=delay)
            if delay <= wake_within:
                wake_at = values["dispatched_at"] = values["next_attempt_at"]
    updated = conn.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery["id"], WebhookDelivery.status == PENDING,
               WebhookDelivery.lease_expires_at == delivery["lease"])
        .values(**values)
    ).rowcount == 1
    if not updated:
        return "lost", None
    return outcome, wake_at


# API -------------------------------------------------------------------------------------------

def _owned_task(conn: Connection, account_id: int, task_id: str) -> Row[str, str, str | None] | None:
    return conn.execute(select(ImageTask.id, ImageTask.status, ImageTask.webhook_url)
                        .where(ImageTask.id == task_id, ImageTask.account_id == account_id)).first()


def _render(delivery: Row[*tuple[Any, ...]], attempts: Sequence[Row[*tuple[Any, ...]]]) -> dict:
    return {
        "id": delivery.id,
        "event_type": delivery.event_type,
        "url": delivery.url,
        "status": delivery.status,
        "attempt_count": delivery.attempt_count,
        "next_attempt_at": iso(delivery.next_attempt_at),
        "created_at": iso(delivery.created_at),
        "delivered_at": iso(delivery.delivered_at),
        "attempts": [{"attempted_at": iso(a.attempted_at), "status_code": a.status_code,
                      "error": a.error, "duration_ms": a.duration_ms} for a in attempts],
    }


def list_for_task(conn: Connection, account_id: int, task_id: str) -> list[dict] | None:
    """The task's webhook deliveries with every attempt, oldest first; None if not this account's task."""
    if _owned_task(conn, account_id, task_id) is None:
        return None
    deliveries = conn.execute(select(WebhookDelivery).where(WebhookDelivery.task_id == task_id)
                              .order_by(WebhookDelivery.created_at)).all()
    out = []
    for delivery in deliveries:
        attempts = conn.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery.id)
                                .order_by(WebhookAttempt.id)).all()
        out.append(_render(delivery, attempts))
    return out


def _may_redeliver(now: datetime) -> ColumnElement[bool]:
    """The condition for a delivery to be reset now: no attempt due or in flight, and no
    redelivery in the last REDELIVERY_INTERVAL. (A retry scheduled for later may be brought forward.)"""
    idle = or_(WebhookDelivery.status != PENDING,
               and_(WebhookDelivery.next_attempt_at > now,
                    or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < now)))
    spaced = or_(WebhookDelivery.redelivered_at.is_(None), WebhookDelivery.redelivered_at <= now - REDELIVERY_INTERVAL)
    return and_(idle, spaced)


def _rate_limited(conn: Connection, task_id: str, delivery_id: str, now: datetime) -> APIError:
    """The 429 for a redelivery refused by _may_redeliver, with how long to wait."""
    row = conn.execute(select(WebhookDelivery.status, WebhookDelivery.next_attempt_at,
                              WebhookDelivery.lease_expires_at, WebhookDelivery.redelivered_at)
                       .where(WebhookDelivery.id == delivery_id)).one()
    in_flight = row.status == PENDING and row.lease_expires_at is not None and row.lease_expires_at >= now
    due = row.status == PENDING and (row.next_attempt_at is None or row.next_attempt_at <= now)
    wait = 0.0
    if row.redelivered_at is not None:
        wait = (row.redelivered_at + REDELIVERY_INTERVAL - now).total_seconds()
    if in_flight:  # the lease's end: the latest the attempt can take
        wait = max(wait, (row.lease_expires_at - now).total_seconds())
    seconds = max(1, math.ceil(wait))
    why = ("an attempt to deliver it is due or under way" if in_flight or due
           else f"it was redelivered less than {REDELIVERY_INTERVAL.seconds} seconds ago")
    return APIError(429, f"Task {task_id}'s event is not sent again yet: {why}. Try again in {seconds} s.",
                    code="redelivery_rate_limited", headers={"Retry-After": str(seconds)})


def redeliver(conn: Connection, account_id: int, task_id: str) -> dict | None:
    """Send the task's event again, now, with a fresh retry schedule and the same webhook-id
    (it is the same event). None if not this account's task; 409 if there is nothing to send;
    429 (`redelivery_rate_limited`, with Retry-After) while an attempt is due or in flight, or
    within REDELIVERY_INTERVAL of the last redelivery. Decided by one compare-and-set on the
    delivery row, so it holds across web processes and concurrent requests."""
    task = _owned_task(conn, account_id, task_id)
    if task is None:
        return None
    if not task.webhook_url:
        raise APIError(409, f"Task {task_id} has no webhook_url.", code="no_webhook_url")
    if task.status not in taskview.TERMINAL:
        raise APIError(409, f"Task {task_id} is {task.status}; its event is sent when it ends.",
                       code="task_not_finished")
    now = utcnow()
    delivery_id = conn.execute(select(WebhookDelivery.id).where(WebhookDelivery.task_id == task_id)
                               .order_by(WebhookDelivery.created_at.desc()).limit(1)).scalar()
    if delivery_id is None:
        delivery_id = record_event(conn, task_id)
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(redelivered_at=now))
    else:
        reset = conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, _may_redeliver(now))
                             .values(status=PENDING, attempt_count=0, next_attempt_at=now, dispatched_at=None,
                                     lease_expires_at=None, delivered_at=None, redelivered_at=now)).rowcount
        if reset != 1:
            raise _rate_limited(conn, task_id, delivery_id, now)
    delivery = conn.execute(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)).one()
    return _render(delivery, [])
