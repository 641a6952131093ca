"""Keyset pagination, newest first, for every list the API returns (tasks, usage).

A cursor is the (created_at, id) of the last row of a page, opaque to clients.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, SQLColumnExpression, and_, or_

from app.core.errors import invalid
from app.core.params import is_id


def encode_cursor(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, row_id = raw.split("|", 1)
        position = datetime.fromisoformat(moment)
        if position.tzinfo is None or not is_id(row_id):
            raise ValueError("not a cursor")
        # In UTC, as the database compares it: a time at the calendar's edge overflows here, not there.
        return position.astimezone(UTC), row_id
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise invalid("cursor", "'cursor' is not a cursor this API returned.") from None


def older_than(position: tuple[datetime, str], created_at: SQLColumnExpression[datetime],
               row_id: SQLColumnExpression[str]) -> ColumnElement[bool]:
    """Rows after `position` (a decoded cursor) in (created_at DESC, id DESC) order."""
    moment, last_id = position
    return or_(created_at < moment, and_(created_at == moment, row_id < last_id))
