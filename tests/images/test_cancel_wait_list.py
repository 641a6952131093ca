"""Cancel (refunded once, webhook fired), Prefer: wait=N, and the task list with cursor pagination."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from sqlalchemy import func, select, update

from app.core import ledger
from app.core.models import ImageTask, LedgerEntry
from tests.conftest import wait_for_task
from tests.taskrows import parked_task


def refunds(engine, task_id: str) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.kind == "refund", LedgerEntry.reference == task_id)).scalar_one()


def balance(client, account) -> str:
    return client.get("/v1/balance", headers=account.headers).json()["balance"]


# Cancel -----------------------------------------------------------------------------------------

def test_cancel_a_pending_task_refunds_once_and_fires_its_webhook(client, worker, engine, account, receiver):
    task_id = parked_task(engine, account, webhook_url=receiver.url("cancel-pending"))
    assert balance(client, account) == "9.99900"
    r = client.post(f"/v1/tasks/{task_id}/cancel", headers=account.headers)
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["status"] == "canceled" and task["refunded"] is True
    assert task["error"]["code"] == "canceled"
    assert balance(client, account) == "10.00000"
    again = client.post(f"/v1/tasks/{task_id}/cancel", headers=account.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "task_finished"
    assert refunds(engine, task_id) == 1 and balance(client, account) == "10.00000"

    [request] = receiver.wait_for("cancel-pending")
    event = json.loads(request.body)
    assert event["type"] == "task.canceled"
    assert event["data"] == client.get(f"/v1/tasks/{task_id}", headers=account.headers).json()


def test_cancel_while_processing_wins_over_the_late_result(client, worker, engine, account, fake_images):
    prompt = f"[sleep:1.5] slow {uuid.uuid4().hex[:8]}"
    task_id = client.post("/v1/images/generations", headers=account.headers,
                          json={"model": "gpt-image-2", "prompt": prompt}).json()["task_id"]
    deadline = time.monotonic() + 20
    while client.get(f"/v1/tasks/{task_id}", headers=account.headers).json()["status"] != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client.post(f"/v1/tasks/{task_id}/cancel", headers=account.headers)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    deadline = time.monotonic() + 20
    while fake_images.count(prompt) < 1:  # the worker's call to the backend returns after this
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(2.0)
    task = client.get(f"/v1/tasks/{task_id}", headers=account.headers).json()
    assert task["status"] == "canceled" and "result" not in task
    assert refunds(engine, task_id) == 1
    assert balance(client, account) == "10.00000"


def test_cancel_a_finished_task_is_409(client, worker, account):
    task_id = client.post("/v1/images/generations", headers=account.headers,
                          json={"model": "local-image", "prompt": "done"}).json()["task_id"]
    assert wait_for_task(client, account.headers, task_id)["status"] == "completed"
    r = client.post(f"/v1/tasks/{task_id}/cancel", headers=account.headers)
    assert r.status_code == 409 and "completed" in r.json()["error"]["message"]


def test_cancel_someone_elses_task_is_404(client, engine, make_account):
    owner, other = make_account(), make_account()
    task_id = parked_task(engine, owner)
    assert client.post(f"/v1/tasks/{task_id}/cancel", headers=other.headers).status_code == 404
    assert client.post("/v1/tasks/media_nope/cancel", headers=other.headers).status_code == 404
    assert client.get(f"/v1/tasks/{task_id}", headers=owner.headers).json()["status"] == "pending"


def test_racing_cancels_refund_once(client, engine, account):
    from concurrent.futures import ThreadPoolExecutor

    task_id = parked_task(engine, account)
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: client.post(f"/v1/tasks/{task_id}/cancel",
                                                    headers=account.headers).status_code, range(8)))
    assert sorted(codes) == [200] + [409] * 7
    assert refunds(engine, task_id) == 1
    with engine.connect() as conn:
        assert ledger.balance(conn, account.id) == ledger.ledger_sum(conn, account.id)


# Prefer: wait -----------------------------------------------------------------------------------

def test_wait_returns_the_finished_task(client, worker, account):
    r = client.post("/v1/images/generations", headers={**account.headers, "Prefer": "wait=20"},
                    json={"model": "local-image", "prompt": "wait for me"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed" and r.json()["result"]["urls"]
    assert r.headers["preference-applied"] == "wait=20"


def test_wait_gives_up_with_202(client, worker, account):
    started = time.monotonic()
    r = client.post("/v1/images/generations", headers={**account.headers, "Prefer": "respond-async, wait=1"},
                    json={"model": "gpt-image-2", "prompt": f"[sleep:3] {uuid.uuid4().hex}"})
    elapsed = time.monotonic() - started
    assert r.status_code == 202 and r.json()["status"] == "pending"
    assert 0.9 <= elapsed < 2.5


def test_wait_is_capped_at_60(client, worker, account):
    r = client.post("/v1/images/generations", headers={**account.headers, "Prefer": "wait=3600"},
                    json={"model": "local-image", "prompt": "quick"})
    assert r.status_code == 200 and r.headers["preference-applied"] == "wait=60"


def test_wait_must_be_a_number(client, account):
    r = client.post("/v1/images/generations", headers={**account.headers, "Prefer": "wait=soon"},
                    json={"model": "local-image", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Prefer"


def test_waiting_requests_do_not_block_the_server(worker, make_account):
    """30 requests waiting at once on one event loop: other requests are still answered at once,
    and each waiting one answers when its task finishes."""
    import asyncio

    import httpx

    from app.http.app import create_app
    from tests.servers import ThreadedServer

    account = make_account()

    async def main(url):
        async with httpx.AsyncClient(base_url=url, headers=account.headers, timeout=60) as http:
            waiting = [asyncio.ensure_future(http.post(
                "/v1/images/generations", headers={"Prefer": "wait=30"},
                json={"model": "gpt-image-2", "prompt": f"[sleep:3] {uuid.uuid4().hex}"})) for _ in range(30)]
            await asyncio.sleep(1.0)
            started = time.monotonic()
            r = await http.get("/v1/balance")
            meanwhile = time.monotonic() - started
            assert r.status_code == 200 and not any(w.done() for w in waiting)
            return await asyncio.gather(*waiting), meanwhile

    with ThreadedServer(create_app()) as server:
        answers, meanwhile = asyncio.run(main(server.url))
    assert meanwhile < 0.5
    assert all(a.status_code == 200 and a.json()["status"] == "completed" for a in answers)


# List -------------------------------------------------------------------------------------------

@pytest.fixture
def listed(engine, make_account):
    account = make_account()
    ids = [parked_task(engine, account) for _ in range(7)]
    with engine.begin() as conn:
        conn.execute(update(ImageTask).where(ImageTask.id.in_(ids[:2])).values(status="canceled"))
    return account, ids


def test_list_is_newest_first_and_pages_by_cursor(client, listed, make_account):
    account, ids = listed
    seen, cursor = [], None
    while True:
        r = client.get("/v1/tasks", headers=account.headers,
                       params={"limit": 3, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["data"]) <= 3
        seen += [t["task_id"] for t in page["data"]]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    other = make_account()
    assert client.get("/v1/tasks", headers=other.headers).json()["data"] == []


def test_list_filters_by_status(client, listed):
    account, ids = listed
    canceled = client.get("/v1/tasks?status=canceled", headers=account.headers).json()
    assert [t["task_id"] for t in canceled["data"]] == [ids[1], ids[0]]
    assert all(t["status"] == "canceled" for t in canceled["data"])
    both = client.get("/v1/tasks?status=canceled,pending&limit=100", headers=account.headers).json()
    assert len(both["data"]) == 7 and both["has_more"] is False
    assert client.get("/v1/tasks?status=completed", headers=account.headers).json()["data"] == []


def test_list_items_have_the_task_shape(client, listed):
    account, ids = listed
    [item] = client.get("/v1/tasks?limit=1", headers=account.headers).json()["data"]
    assert item == client.get(f"/v1/tasks/{ids[-1]}", headers=account.headers).json()


@pytest.mark.parametrize("query,param", [("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"),
                                        ("status=done", "status"), ("cursor=%21%21", "cursor"),
                                        ("cursor=bm9wZQ", "cursor")])
def test_list_rejects_bad_parameters(client, account, query, param):
    r = client.get(f"/v1/tasks?{query}", headers=account.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_list_needs_a_key(client):
    assert client.get("/v1/tasks").status_code == 401
