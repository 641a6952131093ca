"""The usage CSV download: the same rows and columns as `GET /v1/usage?format=csv` (app.proxy.records),
read a page at a time so a year of records never sits in memory.

Columns (documented in the README): see app.proxy.records.COLUMNS.
"""

from __future__ import annotations

from typing import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncEngine

from app.proxy import records


async def csv_chunks(engine: AsyncEngine, account_id: int, filters: records.Filters,
                     batch: int = records.MAX_LIMIT) -> AsyncIterator[str]:
    """The header row, then one chunk of CSV per page of `batch` records, newest first. Each
    page is its own short read: no transaction stays open while the client downloads."""
    cursor, header = None, True
    while True:
        async with engine.connect() as conn:
            rows, cursor = await conn.run_sync(records.page, account_id, filters, cursor=cursor, limit=batch)
        yield records.csv_text(rows, header=header)
        header = False
        if cursor is None:
            return
