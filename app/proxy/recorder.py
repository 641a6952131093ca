"""The queue of finished calls: usage records and settlements, written in batches off the response path.

The proxy hands each finished call to `UsageRecorder.record` (no await, no database).
One background task collects what has queued up, at most once per `INTERVAL` seconds,
and hands it as one batch to a writer, which applies it in one transaction
(app.proxy.settlement). The lifespan's `stop` writes what is left.

The writer is `app.proxy.writer.ProcessWriter`, a child process of the web
process: in a thread of the web process, the database work held the
interpreter's lock in slices that made requests wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Protocol

from app.core.models import time_ordered_id
from app.proxy.settlement import KEEP_BATCH_IDS, Entry, Release

log = logging.getLogger(__name__)
BATCH = 2000
# While the database is unreachable or failing, a batch goes again after pauses doubling up to this.
MAX_PAUSE = 5.0
INTERVAL = 0.1  # seconds between batches: bounds the transactions per second (each has a fixed cost)
# A batch the database keeps failing is given up after this long (seconds): well within
# KEEP_BATCH_IDS, so that a batch whose commit went through unreported is still recognized
# whenever it comes again; at stop, after STOP_PATIENCE. Its holds come back with their lease.
RESEND_FOR = KEEP_BATCH_IDS.total_seconds() / 2
STOP_PATIENCE = 10.0
# Calls waiting this long (seconds) with no batch written meanwhile: the writer is stalled.
STALLED_AFTER = 60.0


class Outcome(enum.Enum):
    """How sending a batch ended (the value says it in the log)."""

    WRITTEN = "written"
    REFUSED = "refused by the database"
    GIVEN_UP = "given up, the database failing too long"


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
    def __init__(self, writer: Writer, *, max_pause: float = MAX_PAUSE, resend_for: float = RESEND_FOR,
                 stop_patience: float = STOP_PATIENCE):
        self._writer = writer
        self._max_pause, self._resend_for, self._stop_patience = max_pause, resend_for, stop_patience
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
        if outcome is Outcome.WRITTEN:
            return True
        if outcome is Outcome.GIVEN_UP:
            log.error("could not write usage batch %s (%d items): %s; its holds stay", batch_id, len(batch),
                      outcome.value)
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
            if outcome is not Outcome.WRITTEN:
                log.error("could not write %r (%s); its hold stays", item, outcome.value)
                written = False
        return written

    async def _send(self, batch_id: str, items: list[Entry | Release]) -> Outcome:
        """Send `items` under `batch_id` until written, refused, or failing for `resend_for`
        seconds (`stop_patience` at stop); raises when the writer can't tell whether it wrote them."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                await self._writer.write(batch_id, items)
                return Outcome.WRITTEN
            except WriteFailed as failure:
                if failure.refused:
                    return Outcome.REFUSED
                if time.monotonic() - started >= (self._stop_patience if self._stopping else self._resend_for):
                    return Outcome.GIVEN_UP
                pause = min(0.1 * 2 ** min(attempt, 10), self._max_pause)
                # The traceback once: an outage would otherwise log one every few seconds.
                log.warning("writing %d usage records failed; trying again in %.1f s", len(items), pause,
                            exc_info=attempt == 0)
                self._failed_at = time.monotonic()
                await asyncio.sleep(pause)
                attempt += 1
