"""Idempotency-Key: a retried submit returns the first answer and is charged once, also when racing."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select, update

from app.core import ledger
from app.core.models import ImageTask, LedgerEntry, utcnow
from tests.servers import ThreadedServer

BODY = {"model": "gpt-image-2", "prompt": "a quiet harbour [status:400]"}  # should a worker run it: fail, refund


def post(client, account, body, key):
    return client.post("/v1/images/generations", headers={**account.headers, "Idempotency-Key": key}, json=body)


def charges(engine, account_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.account_id == account_id, LedgerEntry.kind == "charge")).scalar_one()


def test_same_key_same_body_returns_the_first_answer_and_charges_once(client, engine, account):
    key = uuid.uuid4().hex
    first = post(client, account, BODY, key)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = post(client, account, {"prompt": BODY["prompt"], "model": BODY["model"]}, key)  # keys reordered
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert charges(engine, account.id) == 1
    assert client.get("/v1/balance", headers=account.headers).json()["balance"] == "9.98800"


@pytest.mark.parametrize("again", [
    {**BODY, "size": None}, {**BODY, "size": "1:1"}, {**BODY, "resolution": None, "n": 1},
    {**BODY, "image_urls": None, "webhook_url": None}, {**BODY, "image_urls": []},
])
def test_a_default_spelled_out_or_null_is_the_same_request(again, client, engine, account):
    # `"size": null`, `"size": "1:1"` and no size all ask for the same task: a replay, not a 422.
    key = uuid.uuid4().hex
    first = post(client, account, BODY, key)
    assert first.status_code == 202
    replay = post(client, account, again, key)
    assert replay.status_code == 202 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    assert charges(engine, account.id) == 1


def test_a_task_fingerprinted_by_its_raw_body_still_replays(client, engine, account):
    # Tasks submitted before requests were fingerprinted by their validated form kept the hash
    # of their raw body: within the 24 hours, the same body must still replay.
    from app.images.routes import body_hash

    key = uuid.uuid4().hex
    first = post(client, account, BODY, key)
    with engine.begin() as conn:
        conn.execute(update(ImageTask).where(ImageTask.id == first.json()["task_id"])
                     .values(request_hash=body_hash(BODY)))
    replay = post(client, account, BODY, key)
    assert replay.status_code == 202 and replay.json() == first.json()
    assert post(client, account, {**BODY, "prompt": "another"}, key).status_code == 422
    assert charges(engine, account.id) == 1


def test_same_key_other_body_is_422(client, engine, account):
    key = uuid.uuid4().hex
    assert post(client, account, BODY, key).status_code == 202
    r = post(client, account, {**BODY, "size": "16:9"}, key)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "idempotency_key_reused"
    assert r.json()["error"]["param"] == "Idempotency-Key"
    assert charges(engine, account.id) == 1


def test_keys_are_scoped_to_the_account(client, make_account):
    key = uuid.uuid4().hex
    a, b = make_account(), make_account()
    assert post(client, a, BODY, key).json()["task_id"] != post(client, b, BODY, key).json()["task_id"]


def test_without_a_key_every_submit_is_new(client, engine, account):
    ids = {client.post("/v1/images/generations", headers=account.headers, json=BODY).json()["task_id"]
           for _ in range(2)}
    assert len(ids) == 2 and charges(engine, account.id) == 2


def test_a_key_older_than_24_hours_starts_afresh(client, engine, account):
    key = uuid.uuid4().hex
    first = post(client, account, BODY, key).json()["task_id"]
    with engine.begin() as conn:
        conn.execute(update(ImageTask).where(ImageTask.id == first)
                     .values(created_at=utcnow() - timedelta(hours=24, minutes=1)))
    second = post(client, account, {**BODY, "size": "3:2"}, key)  # even with another body
    assert second.status_code == 202 and second.json()["task_id"] != first
    assert post(client, account, {**BODY, "size": "3:2"}, key).json()["task_id"] == second.json()["task_id"]
    assert charges(engine, account.id) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "ключ".encode(), "a\tb"])
def test_malformed_keys_are_400(client, account, key):
    r = client.post("/v1/images/generations", headers={**account.headers, "Idempotency-Key": key}, json=BODY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "Idempotency-Key"


def test_a_rejected_request_does_not_use_up_its_key(client, make_account):
    poor = make_account(balance="0")
    key = uuid.uuid4().hex
    assert post(client, poor, BODY, key).status_code == 402
    assert post(client, poor, {"model": "nope", "prompt": "x"}, key).status_code == 400


@pytest.fixture(scope="module")
def gateway(database):
    from app.http.app import create_app

    with ThreadedServer(create_app(), limit_concurrency=500) as server:
        yield server.url


async def _race(url: str, headers: dict, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60,
                                 limits=httpx.Limits(max_connections=len(bodies))) as http:
        return await asyncio.gather(*(http.post("/v1/images/generations", json=b) for b in bodies))


def test_racing_duplicates_make_one_task_and_one_charge(gateway, engine, make_account):
    # Balance for exactly one: a loser must answer with the winner's task, not a 402.
    account = make_account(balance="0.012")
    headers = {**account.headers, "Idempotency-Key": uuid.uuid4().hex}
    responses = asyncio.run(_race(gateway, headers, [BODY] * 25))
    assert [r.status_code for r in responses] == [202] * 25, [r.text for r in responses if r.status_code != 202]
    assert len({r.json()["task_id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 24
    assert charges(engine, account.id) == 1
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ImageTask)
                            .where(ImageTask.account_id == account.id)).scalar_one() == 1
        assert ledger.balance(conn, account.id) == ledger.ledger_sum(conn, account.id) >= 0


def test_racing_different_bodies_on_one_key_one_wins_the_rest_are_422(gateway, engine, make_account):
    account = make_account()
    headers = {**account.headers, "Idempotency-Key": uuid.uuid4().hex}
    bodies = [{**BODY, "prompt": f"{BODY['prompt']} {i}"} for i in range(10)]
    responses = asyncio.run(_race(gateway, headers, bodies))
    assert sorted(r.status_code for r in responses) == [202] + [422] * 9
    assert charges(engine, account.id) == 1


def test_the_loser_of_an_insert_race_answers_with_the_winners_task(engine, make_account):
    """Two transactions with one key: the second waits on the first (the unique index on PostgreSQL,
    the write lock on SQLite) and, once it commits, replays its answer with no charge of its own."""
    import threading

    from app.core.auth import Principal
    from app.core.catalog import load
    from app.core.settings import get_settings
    from app.images import service
    from app.images.validation import parse

    settings = get_settings()
    request, _ = parse(BODY, load(settings.catalog_path, settings.env))
    account = make_account(balance="0.012")
    principal = Principal(account.id, None)
    key = uuid.uuid4().hex
    results = []

    def second():
        with engine.begin() as conn:
            results.append(service.submit_once(conn, principal, request, key, ("h", "h")))

    with engine.begin() as conn:
        first, replayed = service.submit_once(conn, principal, request, key, ("h", "h"))
        assert not replayed
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the first transaction
    thread.join(10)
    assert results == [(first, True)]
    assert charges(engine, account.id) == 1
