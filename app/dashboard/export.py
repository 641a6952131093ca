"""Usage records as CSV, streamed: one header row, then one row per request, newest first.

Columns (documented in the README):
  id, created_at (UTC, ISO 8601), api_key_prefix, api_key_name, model, api_format, stream,
  input_tokens, output_tokens, cached_tokens, reasoning_tokens, usage_reported, cost_usd
  (exact, 9 decimals), upstream_status, latency_ms, ttfb_ms, client_disconnected
"""

from __future__ import annotations

import csv
import io
from typing import Iterable, Iterator

from app import money

COLUMNS = ("id", "created_at", "api_key_prefix", "api_key_name", "model", "api_format", "stream",
           "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "usage_reported", "cost_usd",
           "upstream_status", "latency_ms", "ttfb_ms", "client_disconnected")


def _text(value: str | None) -> str:
    """Free text (key names) that a spreadsheet would run as a formula gets a leading quote."""
    value = value or ""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _row(record: dict) -> list:
    return [
        record["id"], record["created_at"].isoformat().replace("+00:00", "Z"), record.get("key_prefix") or "",
        _text(record.get("key_name")), _text(record["model"]), record["api_format"], str(bool(record["stream"])).lower(),
        record["input_tokens"], record["output_tokens"], record["cached_tokens"], record["reasoning_tokens"],
        str(bool(record["usage_reported"])).lower(), f"{money.to_decimal(record['cost']):.9f}",
        "" if record["upstream_status"] is None else record["upstream_status"], record["latency_ms"],
        "" if record["ttfb_ms"] is None else record["ttfb_ms"], str(bool(record["client_disconnected"])).lower(),
    ]


def csv_chunks(batches: Iterable[list[dict]]) -> Iterator[str]:
    """The header, then one chunk of CSV text per batch of records (see queries.usage_batches)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    yield buffer.getvalue()
    for batch in batches:
        buffer.seek(0)
        buffer.truncate()
        writer.writerows(_row(record) for record in batch)
        yield buffer.getvalue()
