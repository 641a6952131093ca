"""Submit, poll, balance and auth, through the HTTP API."""

from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import select

from app.core import keys
from app.core.models import ImageTask, LedgerEntry


def submit(client, account, **body):
    payload = {"model": "gpt-image-2", "prompt": "a lighthouse at dawn", **body}
    return client.post("/llm-api/v1/images/generations", headers=account.headers, json=payload)


def test_submit_answers_202_debits_and_writes_one_ledger_row(client, engine, account):
    r = submit(client, account, size="16:9", resolution="2k")
    assert r.status_code == 202
    body = r.json()
    assert re.fullmatch(r"media_[0-9a-f]{24}", body["task_id"])
    assert body == {"task_id": body["task_id"], "status": "pending", "model": "gpt-image-2", "charge": "0.02400"}
    assert client.get("/llm-api/v1/balance", headers=account.headers).json() == {"balance": "9.97600",
                                                                               "currency": "USD"}
    with engine.connect() as conn:
        rows = conn.execute(select(LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.reference)
                            .where(LedgerEntry.account_id == account.id).order_by(LedgerEntry.id)).all()
        task = conn.execute(select(ImageTask).where(ImageTask.id == body["task_id"])).mappings().one()
    assert rows == [("topup", 10_000_000_000, None), ("charge", -24_000_000, body["task_id"])]
    assert task["charge"] == 24_000_000 and task["size"] == "16:9" and task["resolution"] == "2k"


def test_poll_returns_the_task(client, account):
    task_id = submit(client, account).json()["task_id"]
    r = client.get(f"/v1/tasks/{task_id}", headers=account.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["task_id"] == task_id and body["model"] == "gpt-image-2" and body["charge"] == "0.01200"
    assert body["status"] in ("pending", "processing", "completed")
    assert body["created_at"].endswith("Z")


def test_routes_are_served_at_root_and_under_llm_api(client, account):
    for prefix in ("", "/llm-api"):
        assert client.post(f"{prefix}/v1/images/generations", headers=account.headers,
                           json={"model": "gpt-image-2", "prompt": "x"}).status_code == 202
        assert client.get(f"{prefix}/v1/balance", headers=account.headers).status_code == 200


def test_insufficient_balance_is_402_and_makes_nothing(client, engine, make_account):
    poor = make_account(balance="0.01")
    r = submit(client, poor)  # costs 0.012
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "insufficient_balance"
    with engine.connect() as conn:
        assert conn.execute(select(ImageTask.id).where(ImageTask.account_id == poor.id)).first() is None
        assert [k for (k,) in conn.execute(select(LedgerEntry.kind).where(LedgerEntry.account_id == poor.id))] \
            == ["topup"]
    assert client.get("/v1/balance", headers=poor.headers).json()["balance"] == "0.01000"


def test_another_accounts_task_is_404(client, account, make_account):
    task_id = submit(client, account).json()["task_id"]
    other = make_account()
    r = client.get(f"/v1/tasks/{task_id}", headers=other.headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "task_not_found"
    assert client.get("/v1/tasks/media_doesnotexist", headers=account.headers).status_code == 404


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic abc"},
    {"Authorization": "Bearer sk-not-ours"},
    {"Authorization": "Bearer llm_" + "x" * 43},
    {"x-api-key": "llm_" + "y" * 43},
])
def test_missing_or_unknown_key_is_401(client, headers):
    r = client.post("/v1/images/generations", headers=headers, json={"model": "gpt-image-2", "prompt": "x"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/balance", headers=headers).status_code == 401


def test_x_api_key_header_works(client, account):
    r = client.get("/v1/balance", headers={"x-api-key": account.key})
    assert r.status_code == 200


def test_revoked_key_stops_working_within_the_cache_time(client, engine, account, settings):
    assert client.get("/v1/balance", headers=account.headers).status_code == 200
    with engine.begin() as conn:
        assert keys.revoke(conn, account.key) == 1
    time.sleep(settings.key_cache_seconds + 0.1)
    assert client.get("/v1/balance", headers=account.headers).status_code == 401


def test_keys_are_long_random_and_stored_hashed(engine, account):
    assert re.fullmatch(r"llm_[A-Za-z0-9_-]{32,}", account.key)
    from app.core.models import ApiKey

    with engine.connect() as conn:
        row = conn.execute(select(ApiKey).where(ApiKey.account_id == account.id)).mappings().one()
    assert row["key_hash"] == keys.hash_key(account.key) and account.key not in row.values()
    assert account.key.startswith(row["prefix"]) and len(row["prefix"]) < 20


def test_unknown_route_is_openai_shaped_404(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_health_reports_database_broker_and_usage_writer(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "database": "ok", "broker": "ok", "usage_writer": "ok"}
