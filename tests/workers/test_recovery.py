"""Lost workers and lost wake-ups: the database, not the broker, decides what still has to run."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from app.core import ledger
from app.core.auth import Principal
from app.core.models import ImageTask, LedgerEntry, utcnow
from app.images import lifecycle, outbox, service
from app.images.validation import parse


def _task(engine, app, account, dispatched_ago: float) -> str:
    """A pending task marked dispatched in its own transaction, so the running relay leaves it alone."""
    request, _ = parse({"model": "gpt-image-2", "prompt": "recovery"}, app.state.services.catalog)
    with engine.begin() as conn:
        task_id = service.submit(conn, Principal(account.id, None), request)["task_id"]
        conn.execute(update(ImageTask).where(ImageTask.id == task_id)
                     .values(dispatched_at=utcnow() - timedelta(seconds=dispatched_ago)))
    return task_id


def test_expired_lease_requeues_then_fails_and_refunds_once(engine, app, account):
    task_id = _task(engine, app, account, dispatched_ago=0)
    for attempt in (1, 2):
        with engine.begin() as conn:
            assert lifecycle.claim(conn, task_id, lease_seconds=60)["attempts"] == attempt
            assert lifecycle.claim(conn, task_id, lease_seconds=60) is None  # a second claim loses
            conn.execute(update(ImageTask).where(ImageTask.id == task_id)
                         .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
            requeued, failed = lifecycle.recover_expired(conn, max_attempts=2)
        if attempt == 1:
            assert task_id in requeued and task_id not in failed
            with engine.connect() as conn:
                row = conn.execute(select(ImageTask).where(ImageTask.id == task_id)).mappings().one()
            assert row["status"] == "pending" and row["dispatched_at"] is None
            with engine.begin() as conn:  # as if the relay had published it again
                conn.execute(update(ImageTask).where(ImageTask.id == task_id).values(dispatched_at=utcnow()))
        else:
            assert task_id in failed
    with engine.begin() as conn:
        assert task_id not in sum(lifecycle.recover_expired(conn, max_attempts=2), [])
        row = conn.execute(select(ImageTask).where(ImageTask.id == task_id)).mappings().one()
        refunds = conn.execute(select(LedgerEntry).where(LedgerEntry.reference == task_id,
                                                         LedgerEntry.kind == "refund")).all()
        assert row["status"] == "failed" and row["error_code"] == "worker_lost" and row["refunded"]
        assert len(refunds) == 1
        assert ledger.balance(conn, account.id) == ledger.ledger_sum(conn, account.id)
        assert lifecycle.fail(conn, task_id, "x", "again") is False  # terminal: no second refund


def test_a_lost_wake_up_is_dispatched_again_after_the_stale_time(engine, app, account):
    task_id = _task(engine, app, account, dispatched_ago=120)
    published: list[str] = []
    outbox.dispatch(engine, published.extend, stale_after=300)
    assert task_id not in published  # dispatched 2 minutes ago: not stale yet
    outbox.dispatch(engine, published.extend, stale_after=60)
    assert task_id in published
    with engine.connect() as conn:
        again = conn.execute(select(ImageTask.dispatched_at).where(ImageTask.id == task_id)).scalar_one()
    assert again > utcnow() - timedelta(seconds=10)


def test_a_failed_publish_leaves_the_task_to_be_dispatched_again(engine, app, account):
    task_id = _task(engine, app, account, dispatched_ago=3600)
    with engine.connect() as conn:
        before = conn.execute(select(ImageTask.dispatched_at).where(ImageTask.id == task_id)).scalar_one()

    def broker_down(ids):
        raise ConnectionError("broker away")

    try:
        outbox.dispatch(engine, broker_down, stale_after=60)
        raise AssertionError("the publish error must propagate")
    except ConnectionError:
        pass
    with engine.connect() as conn:
        assert conn.execute(select(ImageTask.dispatched_at).where(ImageTask.id == task_id)).scalar_one() == before


def test_a_worker_whose_task_was_taken_up_again_can_no_longer_end_it(engine, app, account):
    task_id = _task(engine, app, account, dispatched_ago=0)
    with engine.begin() as conn:
        first = lifecycle.claim(conn, task_id, lease_seconds=60)["attempts"]
        conn.execute(update(ImageTask).where(ImageTask.id == task_id)
                     .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        assert task_id in lifecycle.recover_expired(conn, max_attempts=3)[0]
        second = lifecycle.claim(conn, task_id, lease_seconds=60)["attempts"]
    assert second == first + 1
    with engine.begin() as conn:
        # The first worker comes back late: its lease, result and failure all lose.
        assert lifecycle.extend_lease(conn, task_id, 60, first) is False
        assert lifecycle.complete(conn, task_id, ["http://x/late.png"], first) is False
        assert lifecycle.fail(conn, task_id, "late", "late failure", first) is False
        assert lifecycle.extend_lease(conn, task_id, 60, second) is True
        assert lifecycle.complete(conn, task_id, ["http://x/0.png"], second) is True
        row = conn.execute(select(ImageTask).where(ImageTask.id == task_id)).mappings().one()
    assert row["status"] == "completed" and row["result_urls"] == ["http://x/0.png"] and not row["refunded"]
