"""Usage table filters and pages, the streamed CSV, and spend by day in the browser's time zone."""

from __future__ import annotations

import csv
import io
import re
import secrets
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select

from app.core import keys, money
from app.core.models import ApiKey, UsageRecord
from app.dashboard import queries
from app.proxy import history
from tests.dashboard.conftest import add_task, add_usage

NOW = datetime.now(UTC)


def _rows(html: str) -> list[str]:
    return re.findall(r'<tr data-id="(req_[0-9a-f]+)">', html)


def _csv(response) -> list[dict]:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].startswith('attachment; filename="mediagate-usage-')
    reader = csv.reader(io.StringIO(response.text))
    assert next(reader) == list(history.COLUMNS)
    return [dict(zip(history.COLUMNS, row, strict=True)) for row in reader]


def _second_key(engine, account_id: int) -> tuple[int, int]:
    with engine.begin() as conn:
        first = conn.execute(select(ApiKey.id).where(ApiKey.account_id == account_id)).scalar_one()
        second = keys.create(conn, account_id, "=cmd|' /C calc'!A0").id
    return first, second


def test_usage_filters_by_model_key_and_dates(web, signed_in, engine):
    key_a, key_b = _second_key(engine, signed_in.id)
    r1 = add_usage(engine, signed_in.id, model="gpt-4o", key_id=key_a, at=NOW - timedelta(hours=1))
    r2 = add_usage(engine, signed_in.id, model="claude-sonnet-4-6", key_id=key_b, at=NOW - timedelta(hours=2),
                   api_format="messages", stream=True)
    r3 = add_usage(engine, signed_in.id, model="gpt-4o", key_id=key_b, at=NOW - timedelta(days=10))
    r4 = add_usage(engine, signed_in.id, model="gpt-4o", key_id=key_a, at=NOW - timedelta(days=40))

    assert _rows(web.get("/dashboard/usage").text) == [r1, r2, r3, r4]  # newest first
    assert _rows(web.get("/dashboard/usage?model=gpt-4o").text) == [r1, r3, r4]
    assert _rows(web.get(f"/dashboard/usage?key={key_b}").text) == [r2, r3]
    since = (NOW - timedelta(days=15)).date().isoformat()
    until = (NOW - timedelta(days=5)).date().isoformat()
    assert _rows(web.get(f"/dashboard/usage?from={since}").text) == [r1, r2, r3]
    assert _rows(web.get(f"/dashboard/usage?from={since}&to={until}").text) == [r3]
    assert _rows(web.get(f"/dashboard/usage?from=not-a-date&model=gpt-4o&key={key_a}").text) == [r1, r4]
    page = web.get(f"/dashboard/usage?model=gpt-4o&key={key_a}").text
    assert f'href="/dashboard/usage.csv?model=gpt-4o&amp;key={key_a}"' in page  # the export keeps the filter


def test_usage_is_only_the_accounts_own(web, signed_in, make_account, engine):
    other = make_account()
    theirs = add_usage(engine, other.id)
    mine = add_usage(engine, signed_in.id)
    assert _rows(web.get("/dashboard/usage").text) == [mine]
    assert [r["id"] for r in _csv(web.get("/dashboard/usage.csv"))] == [mine]
    assert theirs not in web.get("/dashboard/").text


def test_usage_pages_cover_every_record_once(web, signed_in, engine):
    same_time = NOW - timedelta(minutes=5)  # ties on created_at are broken by id
    ids = {add_usage(engine, signed_in.id, at=same_time if i % 3 == 0 else NOW - timedelta(seconds=i))
           for i in range(60)}
    first = web.get("/dashboard/usage").text
    page_one = _rows(first)
    assert len(page_one) == 50 and "Newest" not in first
    older = re.search(r'<a href="(\?before=[^"]+)">Older', first).group(1).replace("&amp;", "&")
    second = web.get("/dashboard/usage" + older).text
    page_two = _rows(second)
    assert len(page_two) == 10 and "Older »" not in second and "« Newest" in second
    assert set(page_one) | set(page_two) == ids and not set(page_one) & set(page_two)


def test_csv_export_rows_are_exact(web, signed_in, engine):
    key_a, key_b = _second_key(engine, signed_in.id)
    record = add_usage(engine, signed_in.id, model="gpt-5.4", key_id=key_b, api_format="responses", stream=True,
                       input_tokens=1234, output_tokens=567, cached_tokens=1000, reasoning_tokens=89,
                       cost=4_372_501, upstream_status=200, latency_ms=812, ttfb_ms=None,
                       client_disconnected=True, at=datetime(2025, 5, 4, 3, 2, 1, tzinfo=UTC))
    add_usage(engine, signed_in.id, model="gpt-4o", key_id=key_a)
    response = web.get("/dashboard/usage.csv?model=gpt-5.4")
    rows = _csv(response)
    with engine.connect() as conn:
        prefix = conn.execute(select(ApiKey.prefix).where(ApiKey.id == key_b)).scalar_one()
    assert rows == [{
        "id": record, "created_at": "2025-05-04T03:02:01Z", "model": "gpt-5.4", "api_format": "responses",
        "stream": "true", "input_tokens": "1234", "output_tokens": "567", "cached_tokens": "1000",
        "reasoning_tokens": "89", "usage_reported": "true", "cost": "0.004372501", "upstream_status": "200",
        "latency_ms": "812", "ttfb_ms": "", "client_disconnected": "true", "key_id": str(key_b),
        "key_prefix": prefix, "usage_estimated": "false",
    }]
    # One implementation: the API's CSV of the same filter is the same text.
    api = web.get("/v1/usage?format=csv&model=gpt-5.4", headers=signed_in.headers)
    assert api.status_code == 200 and api.text == response.text


def test_csv_streams_in_pages(web, signed_in, engine, settings):
    import asyncio

    from app.core.db import make_async_engine

    rows = [dict(id=f"req_bulk{i:06d}{secrets.token_hex(3)}", account_id=signed_in.id, model="gpt-4o-mini",
                 api_format="chat", stream=False, input_tokens=i, output_tokens=1, cached_tokens=0,
                 reasoning_tokens=0, usage_reported=True, cost=150 + i, upstream_status=200, latency_ms=5,
                 ttfb_ms=3, client_disconnected=False, created_at=NOW - timedelta(seconds=i))
            for i in range(2500)]
    with engine.begin() as conn:
        conn.execute(UsageRecord.__table__.insert(), rows)

    async def chunks() -> list[str]:
        async_engine = make_async_engine(settings.database_url, pool_size=1)
        try:
            return [c async for c in history.csv_pages(async_engine, signed_in.id, history.Filters(), batch=1000)]
        finally:
            await async_engine.dispose()

    pieces = asyncio.run(chunks())
    assert [piece.count("\r\n") for piece in pieces] == [1001, 1000, 500]  # the header rides with page one
    exported = _csv(web.get("/dashboard/usage.csv"))
    assert len(exported) == 2500
    assert [int(r["input_tokens"]) for r in exported] == list(range(2500))  # newest first
    assert sum(money.from_usd(r["cost"]) for r in exported) == sum(150 + i for i in range(2500))


def test_spend_by_local_day_and_model(engine, make_account):
    acc = make_account()
    tokyo = ZoneInfo("Asia/Tokyo")
    now = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)  # 21:00 on March 10 in Tokyo
    # 01:00 on March 10 in Tokyo, still March 9 in UTC: today, in Tokyo.
    add_usage(engine, acc.id, model="gpt-4o", cost=1_000, at=datetime(2025, 3, 9, 16, 0, tzinfo=UTC))
    add_usage(engine, acc.id, model="gpt-4o", cost=20_000, at=datetime(2025, 3, 4, 0, 0, tzinfo=UTC))
    add_task(engine, acc.id, model="local-image", charge=300_000, at=datetime(2025, 3, 3, 14, 0, tzinfo=UTC))
    add_task(engine, acc.id, model="local-image", charge=999_000, refunded=True, status="failed",
             at=datetime(2025, 3, 9, 20, 0, tzinfo=UTC))  # refunded: not spend
    add_usage(engine, acc.id, model="gpt-4o", cost=5_000_000, at=datetime(2025, 2, 1, tzinfo=UTC))
    with engine.connect() as conn:
        spend = queries.spend(conn, acc.id, tokyo, now)
        utc = queries.spend(conn, acc.id, ZoneInfo("UTC"), now)
    assert spend["days"][-1].isoformat() == "2025-03-10" and spend["days"][0].isoformat() == "2025-02-09"
    assert (spend["today"], spend["week"], spend["month"]) == (1_000, 21_000, 321_000)
    assert spend["series"]["gpt-4o"][29] == 1_000 and spend["series"]["gpt-4o"][23] == 20_000
    assert spend["series"]["local-image"][22] == 300_000  # March 3, 23:00 in Tokyo
    assert utc["today"] == 0 and utc["series"]["gpt-4o"][28] == 1_000  # March 9 in UTC


def test_spend_days_across_a_dst_change(engine, make_account):
    acc = make_account()
    new_york = ZoneInfo("America/New_York")
    now = datetime(2025, 3, 20, 15, 0, tzinfo=UTC)
    # 23:30 on March 9 in New York (EDT began at 02:00 that day): March 9, not March 10.
    add_usage(engine, acc.id, cost=7, at=datetime(2025, 3, 10, 3, 30, tzinfo=UTC))
    with engine.connect() as conn:
        spend = queries.spend(conn, acc.id, new_york, now)
    day = [d.isoformat() for d in spend["days"]].index("2025-03-09")
    assert spend["series"]["gpt-4o"][day] == 7 and sum(spend["series"]["gpt-4o"]) == 7
    assert len(set(spend["days"])) == 30


def test_overview_in_the_browsers_zone(web, signed_in, engine):
    add_usage(engine, signed_in.id, model="gpt-4o", cost=money.from_usd("0.25"), at=NOW - timedelta(seconds=5))
    add_task(engine, signed_in.id, charge=money.from_usd("0.012"), at=NOW - timedelta(seconds=5))
    web.cookies.set("tz", "Asia/Tokyo")
    page = web.get("/dashboard/").text
    assert 'id="tz-name">Asia/Tokyo<' in page
    assert 'id="spend-today">$0.26200<' in page and 'id="spend-month">$0.26200<' in page
    assert 'id="balance">$10.00000<' in page
    assert "<svg" in page and page.count("<rect") >= 2  # a bar per model today, plus legend swatches
    local = (NOW - timedelta(seconds=5)).astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:")
    assert local in page  # rendered in Tokyo time before any script runs
    web.cookies.set("tz", "Not/AZone")
    assert 'id="tz-name">UTC<' in web.get("/dashboard/").text


def test_a_call_shows_on_the_dashboard_as_soon_as_it_has_answered(web, signed_in, llm_upstream):
    """The pages write what their process has served before they read, as GET /v1/usage does."""
    for n in range(3):
        call = web.post("/llm-api/v1/chat/completions", headers=signed_in.headers,
                        json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"call {n}"}]})
        assert call.status_code == 200
        record_id = call.headers["x-mediagate-request-id"]
        assert record_id in _rows(web.get("/dashboard/usage").text)
        assert record_id in _rows(web.get("/dashboard").text)  # the overview's recent requests
        assert record_id in {row["id"] for row in _csv(web.get("/dashboard/usage.csv"))}
