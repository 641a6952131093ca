"""GET /v1/usage: the key's account's records, newest first, by cursor, filtered; and the same as CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import insert

from app.core import keys
from app.core.models import UsageRecord
from app.proxy.history import COLUMNS
from tests.proxy.conftest import usage_rows

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def add_records(engine, account_id: int, key_id: int, count: int, *, model: str = "gpt-4o", start=START,
                step=timedelta(hours=6), prefix: str = "t") -> list[str]:
    rows = [{"id": f"req_{account_id}{prefix}{i:05d}", "account_id": account_id, "api_key_id": key_id, "model": model,
             "api_format": "chat", "stream": i % 2 == 0, "input_tokens": 100 + i, "output_tokens": 10,
             "cached_tokens": 0, "reasoning_tokens": 0, "usage_reported": True, "cost": 1_234_567 + i,
             "upstream_status": 200, "latency_ms": 50, "ttfb_ms": 20, "client_disconnected": False,
             "created_at": start + i * step} for i in range(count)]
    with engine.begin() as conn:
        conn.execute(insert(UsageRecord), rows)
    return [row["id"] for row in rows]


@pytest.fixture
def funded(make_account, engine):
    account = make_account()
    with engine.connect() as conn:
        key_id = keys.lookup(conn, account.key)[0]
    return account, key_id


def test_newest_first_with_cursor_pages(client, funded, engine):
    account, key_id = funded
    ids = add_records(engine, account.id, key_id, 7)
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = client.get("/llm-api/v1/usage", headers=account.headers, params=params).json()
        seen += [row["id"] for row in body["data"]]
        assert body["has_more"] == (body["next_cursor"] is not None)
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    first = client.get("/v1/usage", headers=account.headers, params={"limit": 1}).json()["data"][0]
    assert first == {
        "id": ids[-1], "created_at": "2025-03-03T00:00:00Z", "model": "gpt-4o", "api_format": "chat",
        "stream": True, "input_tokens": 106, "output_tokens": 10, "cached_tokens": 0, "reasoning_tokens": 0,
        "usage_reported": True, "cost": "0.001234573", "upstream_status": 200, "latency_ms": 50, "ttfb_ms": 20,
        "client_disconnected": False, "key_id": key_id, "key_prefix": account.key[:12], "usage_estimated": False}


def test_filters_by_date_model_and_key(client, funded, engine):
    account, key_id = funded
    with engine.begin() as conn:
        other_key = keys.create(conn, account.id, "second")
    t = add_records(engine, account.id, key_id, 8)  # every 6 h from 2025-03-01 12:00 to 03-03 06:00
    c = add_records(engine, account.id, other_key.id, 2, model="claude-sonnet-4-6", prefix="c")

    def ids(**params):
        return [r["id"] for r in client.get("/v1/usage", headers=account.headers, params=params).json()["data"]]

    assert len(ids()) == 10
    assert ids(model="claude-sonnet-4-6") == [c[1], c[0]]
    assert len(ids(key=str(key_id))) == 8 and ids(key=other_key.prefix) == [c[1], c[0]]
    assert ids(model="gpt-4o", **{"from": "2025-03-02", "to": "2025-03-02"}) == [t[5], t[4], t[3], t[2]]
    assert ids(model="gpt-4o", **{"from": "2025-03-02T18:00:00Z"}) == [t[7], t[6], t[5]]
    assert ids(model="gpt-4o", to="2025-03-01T18:00:00Z") == [t[1], t[0]]


def test_only_the_keys_own_account(client, funded, make_account, engine):
    account, key_id = funded
    add_records(engine, account.id, key_id, 2)
    stranger = make_account()
    assert client.get("/v1/usage", headers=stranger.headers).json()["data"] == []


def test_csv_streams_every_matching_record_with_a_header(client, funded, engine):
    account, key_id = funded
    ids = add_records(engine, account.id, key_id, 1203, step=timedelta(minutes=1))  # more than a page of 1000
    response = client.get("/llm-api/v1/usage", headers=account.headers, params={"format": "csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 1 + 1203
    newest = dict(zip(COLUMNS, rows[1], strict=True))
    assert newest["id"] == ids[-1] and newest["cost"] == "0.001235769" and newest["stream"] == "true"
    assert newest["key_prefix"] == account.key[:12]
    limited = client.get("/v1/usage", headers=account.headers,
                         params={"format": "csv", "to": "2025-03-01T12:09:00Z"}).text
    assert len(list(csv.reader(io.StringIO(limited)))) == 1 + 10


def test_bad_parameters_400(client, account):
    for params in ({"limit": "0"}, {"limit": "x"}, {"from": "yesterday"}, {"cursor": "!!"}):
        response = client.get("/v1/usage", headers=account.headers, params=params)
        assert response.status_code == 400 and response.json()["error"]["param"] in params
    assert client.get("/v1/usage").status_code == 401


def test_a_real_call_shows_up(base, client, account, engine):
    httpx.post(base + "/v1/chat/completions", headers=account.headers,
               json={"model": "gpt-4o", "messages": [{"role": "user", "content": "[in:7] [out:3]"}]})
    usage_rows(engine, account.id)
    row = client.get("/v1/usage", headers=account.headers).json()["data"][0]
    assert (row["model"], row["input_tokens"], row["output_tokens"], row["upstream_status"]) == ("gpt-4o", 7, 3, 200)
    assert row["cost"] == "0.000047500"  # 7 x $2.50 + 3 x $10 per 1M tokens


def test_a_call_is_listed_as_soon_as_it_has_answered(base, make_account):
    # No waiting in between: the listing first writes what its web process has served.
    account = make_account()
    for count in range(1, 4):
        answered = httpx.post(base + "/v1/chat/completions", headers=account.headers,
                              json={"model": "gpt-4o", "messages": [{"role": "user", "content": "[in:7] [out:3]"}]})
        assert answered.status_code == 200
        listed = httpx.get(base + "/v1/usage", headers=account.headers).json()["data"]
        assert len(listed) == count and listed[0]["id"] == answered.headers["x-mediagate-request-id"]
