"""app.core.db helpers against the run's database (SQLite, or PostgreSQL in CI)."""

import uuid
from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import insert, select

from app.core import accounts, money
from app.core.db import insert_rows
from app.core.models import UsageRecord


def _rows(account_id: int, prefix: str) -> list[dict]:
    start = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    return [dict(id=f"{prefix}{i}", account_id=account_id, api_key_id=None, model="m'odel \"q\"", api_format="chat",
                 stream=i % 2 == 0, input_tokens=i, output_tokens=2**31 - 1 - i, cached_tokens=0, reasoning_tokens=0,
                 usage_reported=i != 3, cost=10**15 + i, upstream_status=None if i == 4 else 200,
                 latency_ms=i, ttfb_ms=None, client_disconnected=i == 1,
                 # a naive time is UTC, and another zone is converted, as the column type does for Core
                 created_at=start.replace(tzinfo=None) if i == 2 else
                 (start + timedelta(seconds=i)).astimezone(timezone(timedelta(hours=-5))))
            for i in range(5)]


def _read(conn, prefix: str) -> list[tuple]:
    table = UsageRecord.__table__
    rows = conn.execute(select(table).where(table.c.id.like(prefix + "%")).order_by(table.c.id)).mappings()
    return [tuple(value for name, value in row.items() if name != "id") for row in rows]


def test_insert_rows_writes_what_a_core_insert_writes(engine):
    tag = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        account_id = accounts.create(conn, f"db-{tag}@example.com", money.from_usd("1"))
        insert_rows(conn, UsageRecord.__table__, _rows(account_id, f"fast-{tag}-"))
        conn.execute(insert(UsageRecord.__table__), _rows(account_id, f"core-{tag}-"))
        insert_rows(conn, UsageRecord.__table__, [])  # nothing to write: no statement
    with engine.connect() as conn:
        fast, core = _read(conn, f"fast-{tag}-"), _read(conn, f"core-{tag}-")
    assert len(fast) == 5 and fast == core
    assert fast[2][-1] == datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


def test_timestamps_on_sqlite_are_stored_as_sqlalchemy_stores_them():
    """UTCDateTime binds SQLite text in one step; it must be the text SQLAlchemy's DATETIME makes
    of the UTC time, or rows written before and after would compare and sort wrongly."""
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.dialects.sqlite import DATETIME

    from app.core.models import UTCDateTime

    dialect = sqlite.dialect()
    ours, theirs = UTCDateTime().bind_processor(dialect), DATETIME().bind_processor(dialect)
    for value in (datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC),
                  datetime(2026, 3, 1, 12, 30, 15, tzinfo=timezone(timedelta(hours=5, minutes=30))),  # no microseconds
                  datetime(2026, 12, 31, 23, 59, 59, 999999),  # naive: UTC
                  datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC)):
        assert ours(value) == theirs(UTCDateTime().process_bind_param(value, dialect))
    assert ours(datetime(2026, 3, 1, 7, 30, tzinfo=timezone(timedelta(hours=-5)))) == "2026-03-01 12:30:00.000000"
    assert ours(None) is None


def test_time_ordered_ids_sort_by_time_and_do_not_repeat():
    import time

    from app.core.models import time_ordered_id

    first = [time_ordered_id("req_") for _ in range(10_000)]
    time.sleep(0.002)
    later = time_ordered_id("req_")
    assert len(set(first)) == len(first)
    assert all(later > earlier for earlier in first)  # a later millisecond sorts after every earlier id
    assert len(later) == 32 and later.startswith("req_") and int(later[4:], 16) >= 0


def test_a_forked_process_does_not_repeat_its_parent_s_ids():
    """Web processes forked from one parent (uvicorn --workers, gunicorn) share its generator's
    state at the fork; each must draw different ids from then on."""
    import os

    from app.core.models import time_ordered_id

    def random_parts(count: int) -> list[str]:
        return [time_ordered_id("req_")[16:] for _ in range(count)]  # after the 12 digits of time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids to the parent, and nothing else
        try:
            os.write(write, " ".join(random_parts(1000)).encode())
        finally:
            os._exit(0)
    os.close(write)
    mine = set(random_parts(1000))
    with os.fdopen(read, "rb") as pipe:
        theirs = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    assert len(theirs) == 1000 and not mine & theirs
