"""The usage history: an account's records of LLM calls, newest first, filtered, by cursor pages,
as JSON rows or CSV.

Sync functions on a `Connection`; the routes (and the dashboard) run them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core import money, params
from app.core.keys import DISPLAY_CHARS
from app.core.models import ApiKey, UsageRecord, iso
from app.core.pagination import decode_cursor, encode_cursor, older_than

MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
# The CSV's columns, in order; each is the same-named field of a JSON row.
COLUMNS = ("id", "created_at", "model", "api_format", "stream", "input_tokens", "output_tokens", "cached_tokens",
           "reasoning_tokens", "usage_reported", "cost", "upstream_status", "latency_ms", "ttfb_ms",
           "client_disconnected", "key_id", "key_prefix", "usage_estimated")


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    model: str | None = None
    key_id: int | None = None
    key_prefix: str | None = None


def parse_filters(query: Mapping[str, str]) -> Filters:
    """`from`, `to` (dates include the whole day), `model`, `key` (an id or a key's prefix)."""
    key = query.get("key") or None
    key_id = key_prefix = None
    if key is not None:
        if params.is_whole(key):
            key_id = params.integer(key, "key", minimum=1, maximum=params.INT32_MAX)
        else:
            key_prefix = params.text(key, "key")[:DISPLAY_CHARS]
    model = query.get("model") or None
    return Filters(
        since=params.moment(query["from"], "from") if query.get("from") else None,
        until=params.moment(query["to"], "to", end=True) if query.get("to") else None,
        model=params.text(model, "model") if model else None, key_id=key_id, key_prefix=key_prefix,
    )


def parse_limit(value: str | None) -> int:
    return params.optional_integer(value, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)


def page(conn: Connection, account_id: int, filters: Filters, *, cursor: str | None = None,
         limit: int = DEFAULT_LIMIT) -> tuple[list[dict], str | None]:
    """Up to `limit` rows newest first, and the cursor of the next page (None at the end)."""
    stmt = (select(UsageRecord, ApiKey.prefix)
            .outerjoin(ApiKey, ApiKey.id == UsageRecord.api_key_id)
            .where(UsageRecord.account_id == account_id))
    if filters.since:
        stmt = stmt.where(UsageRecord.created_at >= filters.since)
    if filters.until:
        stmt = stmt.where(UsageRecord.created_at < filters.until)
    if filters.model:
        stmt = stmt.where(UsageRecord.model == filters.model)
    if filters.key_id is not None:
        stmt = stmt.where(UsageRecord.api_key_id == filters.key_id)
    if filters.key_prefix:
        stmt = stmt.where(ApiKey.prefix == filters.key_prefix)
    if cursor:
        stmt = stmt.where(older_than(decode_cursor(cursor), UsageRecord.created_at, UsageRecord.id))
    stmt = stmt.order_by(UsageRecord.created_at.desc(), UsageRecord.id.desc()).limit(limit + 1)
    found = conn.execute(stmt).all()
    # On a Core Connection the entity's columns come flattened into each row, beside `prefix`.
    rows = [_row(row, row.prefix) for row in found[:limit]]
    last = found[limit - 1] if len(found) > limit else None
    return rows, encode_cursor(last.created_at, last.id) if last is not None else None


def _row(record: Any, prefix: str | None) -> dict[str, Any]:  # a Row of the record's columns, by name
    return {
        "id": record.id, "created_at": iso(record.created_at),
        "model": record.model, "api_format": record.api_format, "stream": record.stream,
        "input_tokens": record.input_tokens, "output_tokens": record.output_tokens,
        "cached_tokens": record.cached_tokens, "reasoning_tokens": record.reasoning_tokens,
        "usage_reported": record.usage_reported,
        # Full precision: one call often costs less than the 5-decimal balance unit.
        "cost": f"{money.to_decimal(record.cost):.9f}",
        "upstream_status": record.upstream_status, "latency_ms": record.latency_ms, "ttfb_ms": record.ttfb_ms,
        "client_disconnected": record.client_disconnected, "key_id": record.api_key_id, "key_prefix": prefix,
        "usage_estimated": record.usage_estimated,
    }


def csv_text(rows: list[dict], *, header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else str(row[c]).lower() if isinstance(row[c], bool) else row[c]
                         for c in COLUMNS])
    return out.getvalue()


async def csv_pages(engine: AsyncEngine, account_id: int, filters: Filters, cursor: str | None = None,
                    batch: int = MAX_LIMIT) -> AsyncIterator[str]:
    """The header row, then one chunk of CSV per page of `batch` records, newest first (from
    `cursor` on). Each page is its own short read: no transaction stays open while the client
    downloads, and a year of records never sits in memory."""
    header = True
    while True:
        async with engine.connect() as conn:
            rows, cursor = await conn.run_sync(page, account_id, filters, cursor=cursor, limit=batch)
        yield csv_text(rows, header=header)
        header = False
        if cursor is None:
            return
