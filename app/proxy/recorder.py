"""Usage records and settlements, written in batches off the response path.

The proxy hands each finished call to `UsageRecorder.record` (no await, no
database). One background task collects what has queued up, at most once per
`INTERVAL` seconds, and hands it as one batch to a writer, which applies it in
one transaction (`write`): per account (and hold owner), one `ledger.settle` that
releases the holds of the batch's calls and charges their metered costs as one
`usage` ledger row (its reference the first call's id), and a usage row per call
carrying that call's share of the charge. At low traffic a batch is one call, so
the ledger row is that call's. The lifespan's `stop` writes what is left.

The writer is `app.proxy.writer.ProcessWriter`, a child process of the web
process: in a thread of the web process, the database work held the
interpreter's lock in slices that made requests wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import Connection, delete

from app.core import ledger
from app.core.db import insert_rows, insert_unless_exists
from app.core.models import UsageBatch, UsageRecord, time_ordered_id, utcnow

log = logging.getLogger(__name__)
BATCH = 2000
# While the database is unreachable or failing, a batch goes again after pauses doubling up to this.
MAX_PAUSE = 5.0
INTERVAL = 0.1  # seconds between batches: bounds the transactions per second (each has a fixed cost)
# A batch's id is kept this long: what lets a batch sent again be recognized as written.
KEEP_BATCH_IDS = timedelta(hours=1)
# A batch the database keeps failing is given up after this long (seconds): well within
# KEEP_BATCH_IDS, so that a batch whose commit went through unreported is still recognized
# whenever it comes again; at stop, after STOP_PATIENCE. Its holds come back with their lease.
RESEND_FOR = KEEP_BATCH_IDS.total_seconds() / 2
STOP_PATIENCE = 10.0
# Calls waiting this long (seconds) with no batch written meanwhile: the writer is stalled.
STALLED_AFTER = 60.0


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
    usage_estimated: bool = False  # charged from an estimate: the upstream's final usage never came
    owner: str = ""  # the hold row's owner; `UsageRecorder.record` fills it in


@dataclass
class Release:
    """Held balance handed back without a call (an idle hold pool)."""

    account_id: int
    held: int
    owner: str = ""


def write(conn: Connection, items: list, batch_id: str | None = None) -> bool:
    """Settle and record `items` (Entry and Release) in the caller's transaction.

    With a `batch_id`, a batch already written under that id is not applied again:
    returns False then, True when written.
    """
    if batch_id is not None and not _claim(conn, batch_id):
        return False
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
    return True


def _claim(conn: Connection, batch_id: str) -> bool:
    """Mark the batch written, in the transaction that writes it; False if it already was."""
    return insert_unless_exists(conn, UsageBatch.__table__, ("id",), {"id": batch_id, "created_at": utcnow()})


def forget_batches(conn: Connection) -> int:
    """Delete the ids of batches written more than KEEP_BATCH_IDS ago; returns how many."""
    return conn.execute(delete(UsageBatch).where(UsageBatch.created_at < utcnow() - KEEP_BATCH_IDS)).rowcount


class WriteFailed(Exception):
    """The batch was not written: its transaction rolled back, so its items may be written apart.

    `refused`: the database refused something in it (a constraint, a value), which sending it
    again will not change. Otherwise the database was unreachable or failed, and may not later."""

    def __init__(self, message: str = "", *, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class Writer(Protocol):
    """Applies a batch with `write` somewhere off the event loop, and says how it went.

    `write` returns once the batch is committed (or was already, under that id); raises
    WriteFailed if it surely was not, and any other exception when that can't be known
    (then the same batch may only be sent again under the same id).
    """

    async def start(self) -> None: ...

    async def write(self, batch_id: str, items: list) -> None: ...

    async def close(self) -> None: ...


class UsageRecorder:
    def __init__(self, writer: Writer, owner: str = ""):
        self._writer = writer
        # Whose hold rows the items recorded from now on release (set by the hold pool).
        self.owner = owner
        self._queue: asyncio.Queue[Entry | Release | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._recorded = 0  # items recorded so far
        self._done = 0  # of those, the ones written or given up on (they are taken in order)
        self._flushes: list[tuple[int, asyncio.Future]] = []  # (items to be done, who waits for them)
        self._progress_at = time.monotonic()  # when a batch was last done, or waiting began
        self._failed_at: float | None = None  # when the last batch done left items unwritten

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-recorder")

    def record(self, item: Entry | Release) -> None:
        item.owner = self.owner
        if self._recorded == self._done:
            self._progress_at = time.monotonic()
        self._recorded += 1
        self._queue.put_nowait(item)

    def health(self, stalled_after: float = STALLED_AFTER) -> str:
        """"ok", or what is wrong: calls have waited `stalled_after` seconds with no batch
        written meanwhile, or the last batch could not be written (said for `stalled_after`
        seconds, so that a process taken out of rotation for it comes back and tries again)."""
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < stalled_after:
            return "failing: the last usage batch could not be written (see the log)"
        waited, pending = now - self._progress_at, self._recorded - self._done
        if pending and waited > stalled_after:
            return f"stalled: {pending} calls waiting to be recorded, none written for {waited:.0f} s"
        return "ok"

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything recorded before this call is written, or given up on (at most
        `timeout` seconds). What is recorded meanwhile is not waited for: under steady traffic
        the queue is never empty, and a flush still ends with the next batch."""
        if self._task is None or self._done >= self._recorded:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._flushes.append((self._recorded, waiter))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiter, timeout)

    def _flushed(self, everything: bool = False) -> None:
        waiting = []
        for target, waiter in self._flushes:
            if everything or target <= self._done:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((target, waiter))
        self._flushes = waiting

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping = True
        self._queue.put_nowait(None)
        await self._task
        self._task = None
        await self._writer.close()

    async def _run(self) -> None:
        try:
            await self._writer.start()
        except Exception:  # the first batch tries again
            log.warning("could not start the usage writer", exc_info=True)
        stopping = False
        try:
            while not stopping:
                first = await self._queue.get()
                batch = []
                if first is None:
                    stopping = True
                else:
                    batch.append(first)
                while len(batch) < BATCH and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
                if batch:
                    written = await self._write(batch)
                    self._done += len(batch)
                    self._progress_at = time.monotonic()
                    self._failed_at = None if written else self._progress_at
                    self._flushed()
                if not stopping:
                    await asyncio.sleep(INTERVAL)
        finally:
            self._flushed(everything=True)  # nothing more will be written: nobody waits for it

    async def _write(self, batch: list) -> bool:
        """Write the batch under one id, sent again under that id for as long as the database
        is unreachable or failing (a commit that went through but failed to report itself is
        then recognized). If the database refuses something in it, each item is written on its
        own under an id of its own, and only what it refuses is given up.
        Returns False if anything was left unwritten."""
        batch_id = time_ordered_id("ub_")
        try:
            outcome = await self._send(batch_id, batch)
        except Exception:
            # Perhaps written, perhaps not: only the same batch, under the same id, may go again.
            log.error("could not write usage batch %s (%d items); its holds stay", batch_id, len(batch),
                      exc_info=True)
            return False
        if outcome == _WRITTEN:
            return True
        if outcome == _GIVEN_UP:
            log.error("could not write usage batch %s (%d items): %s; its holds stay", batch_id, len(batch), outcome)
            return False
        log.warning("the database refused usage batch %s (%d items); writing them one by one", batch_id, len(batch))
        written = True
        for index, item in enumerate(batch):
            try:
                outcome = await self._send(f"{batch_id}.{index}", [item])
            except Exception:
                # The writer itself is lost (it has already tried new children): the items
                # left would each wait through the same attempts. Give them up together.
                log.error("could not write %r, nor the %d usage items after it; their holds stay", item,
                          len(batch) - index - 1, exc_info=True)
                return False
            if outcome != _WRITTEN:
                log.error("could not write %r (%s); its hold stays", item, outcome)
                written = False
        return written

    async def _send(self, batch_id: str, items: list) -> str:
        """Send `items` under `batch_id` until written, refused, or failing for RESEND_FOR
        (STOP_PATIENCE at stop); raises when the writer can't tell whether it wrote them."""
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                await self._writer.write(batch_id, items)
                return _WRITTEN
            except WriteFailed as failure:
                if failure.refused:
                    return _REFUSED
                if time.monotonic() - started >= (STOP_PATIENCE if self._stopping else RESEND_FOR):
                    return _GIVEN_UP
                pause = min(0.1 * 2 ** min(attempt, 10), MAX_PAUSE)
                # The traceback once: an outage would otherwise log one every few seconds.
                log.warning("writing %d usage records failed; trying again in %.1f s", len(items), pause,
                            exc_info=attempt == 0)
                self._failed_at = time.monotonic()
                await asyncio.sleep(pause)


_WRITTEN, _REFUSED, _GIVEN_UP = "written", "refused by the database", "given up, the database failing too long"
