"""Usage records and settlements, written in batches off the response path.

The proxy hands each finished call to `UsageRecorder.record` (no await, no
database); one background task writes whatever has queued up in a single
transaction: per call, `ledger.settle` (release the hold, charge the metered
cost) and the usage row. The lifespan's `stop` writes what is left.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import Connection, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app import ledger
from app.db import run
from app.models import UsageRecord

log = logging.getLogger(__name__)
BATCH = 500
RETRIES = 5


@dataclass
class Entry:
    """One finished call: its usage record and the hold to settle."""

    id: str
    account_id: int
    api_key_id: int | None
    model: str
    api_format: str
    stream: bool
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_reported: bool
    cost: int  # metered; what is charged may be less if the balance ran out
    upstream_status: int | None
    latency_ms: int
    ttfb_ms: int | None
    client_disconnected: bool
    created_at: datetime
    held: int


def write(conn: Connection, entries: list[Entry]) -> None:
    """Settle and record `entries` in the caller's transaction."""
    rows = []
    for entry in entries:
        row = asdict(entry)
        held = row.pop("held")
        row["cost"] = ledger.settle(conn, entry.account_id, held, entry.cost, reference=entry.id,
                                    note=f"{entry.model} ({entry.api_format})")
        rows.append(row)
    conn.execute(insert(UsageRecord), rows)


class UsageRecorder:
    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-recorder")

    def record(self, entry: Entry) -> None:
        self._queue.put_nowait(entry)

    async def flush(self) -> None:
        """Wait until everything recorded so far is written."""
        await self._queue.join()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task
        self._task = None

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            batch, taken = [], 1
            if first is None:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                taken += 1
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                await self._write(batch)
            for _ in range(taken):
                self._queue.task_done()

    async def _write(self, batch: list[Entry]) -> None:
        try:
            await run(self._engine, write, batch)
            return
        except Exception:
            log.warning("writing %d usage records failed; retrying one by one", len(batch), exc_info=True)
        for entry in batch:
            for attempt in range(RETRIES):
                try:
                    await run(self._engine, write, [entry])
                    break
                except Exception:
                    await asyncio.sleep(0.1 * 2**attempt)
            else:
                log.error("usage record %s (account %s, cost %s) could not be written; its hold of %s stays",
                          entry.id, entry.account_id, entry.cost, entry.held, exc_info=True)
