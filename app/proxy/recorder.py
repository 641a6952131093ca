"""Usage records and settlements, written in batches off the response path.

The proxy hands each finished call to `UsageRecorder.record` (no await, no
database). One background task writes what has queued up, at most every
`interval` seconds, in one transaction: per account (and hold owner), one `ledger.settle` that
releases the holds of the batch's calls and charges their metered costs as
one `usage` ledger row (its reference the first call's id), and a usage row
per call carrying that call's share of the charge. At low traffic a batch is
one call, so the ledger row is that call's. The lifespan's `stop` writes what
is left.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine

from app import ledger
from app.db import insert_rows
from app.models import UsageRecord

log = logging.getLogger(__name__)
BATCH = 2000
RETRIES = 5
INTERVAL = 0.05  # seconds between writes: bounds the recorder's share of the process under load


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
    held: int  # of this process's hold row: what to release there (0 if its lease was lost)
    owner: str = ""  # the hold row's owner; `UsageRecorder.record` fills it in


@dataclass
class Release:
    """Held balance handed back without a call (an idle hold pool)."""

    account_id: int
    held: int
    owner: str = ""


def write(conn: Connection, items: list) -> None:
    """Settle and record `items` (Entry and Release) in the caller's transaction."""
    by_account: dict[tuple[int, str], list] = {}
    for item in items:
        by_account.setdefault((item.account_id, item.owner), []).append(item)
    rows = []
    # In account order: concurrent batches (other processes, lease renewals) lock rows in the same order.
    for (account_id, owner), batch in sorted(by_account.items()):
        entries = [item for item in batch if isinstance(item, Entry)]
        held = sum(item.held for item in batch)
        cost = sum(entry.cost for entry in entries)
        note = (f"{entries[0].model} ({entries[0].api_format})" if len(entries) == 1
                else f"LLM usage: {len(entries)} requests")
        charged = ledger.settle(conn, account_id, held, cost, owner=owner,
                                reference=entries[0].id if entries else "", note=note)
        # Each call's record carries its share of what was charged: all of its cost,
        # unless the balance ran out, and then the calls first in the batch come first.
        for entry in entries:
            row = dict(entry.__dict__)  # not asdict(): it deep-copies every field
            del row["held"], row["owner"]
            row["cost"] = min(entry.cost, charged)
            charged -= row["cost"]
            rows.append(row)
    insert_rows(conn, UsageRecord.__table__, rows)


class UsageRecorder:
    def __init__(self, engine: Engine, owner: str = ""):
        self._engine = engine
        # Whose hold rows the items recorded from now on release (set by the hold pool).
        self.owner = owner
        self._queue: asyncio.Queue[Entry | Release | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-recorder")

    def record(self, item: Entry | Release) -> None:
        item.owner = self.owner
        self._queue.put_nowait(item)

    async def flush(self) -> None:
        """Wait until everything recorded so far is written."""
        if self._task is not None:
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
            if not stopping:
                await asyncio.sleep(INTERVAL)

    def _write_sync(self, items: list) -> None:
        with self._engine.begin() as conn:
            write(conn, items)

    async def _write(self, batch: list) -> None:
        try:
            await asyncio.to_thread(self._write_sync, batch)
            return
        except Exception:
            log.warning("writing %d usage records failed; retrying one by one", len(batch), exc_info=True)
        for entry in batch:
            for attempt in range(RETRIES):
                try:
                    await asyncio.to_thread(self._write_sync, [entry])
                    break
                except Exception:
                    await asyncio.sleep(0.1 * 2**attempt)
            else:
                log.error("could not write %r; its hold stays", entry, exc_info=True)
