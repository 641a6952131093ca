"""The usage writer: a child process of a web process that writes its usage batches.

The recorder's batch transaction is database work for every call: tens of
microseconds of CPU per call, in SQLAlchemy and, on SQLite, in the driver's C
code. In a thread of the web process it competed with the event loop for the
interpreter's lock, and requests arriving meanwhile waited: at one connection,
p99 5-6 ms (direct: 0.1 ms). In a process of its own it leaves the event loop
only the pickling of a batch, about 2 us per call.

It runs at normal priority. Under Linux's SCHED_IDLE policy it gave way to
requests at once, and at one connection p99 fell to about 2 ms; but on a busy
machine an idle-scheduled writer is preempted in the middle of its transaction,
and the web process's hold top-ups wait for its locks: at 32 connections,
streaming p99 rose from 27 ms to 33-52 ms. At normal priority the writer holds
its locks only as long as its work takes.

The child lives as long as its parent's pipe: it is started with the recorder,
reads batches from stdin and answers each on stdout once it is committed, or
with the error that rolled it back. It ignores SIGINT and SIGTERM (a terminal's
Ctrl-C, a process manager stopping the whole group), so the web process can still
hand it the last batches as it shuts down, and exits when that pipe closes: also
when the web process is killed outright.

A child that dies is started again and the batch it had is sent again under the
same id: `settlement.write` applies a batch id once, so a batch committed just
before the child died is not applied twice. Each answer says whether the database
refused the batch (a constraint, a value: sending it again can't help) or failed
(anything else), which is how the recorder knows to split it or to send it again.

Frames are a 4-byte big-endian length and a pickle, between a process and the
child it started (pickle is not for anything else).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import struct
import sys
import time
from typing import BinaryIO

from app.proxy.recorder import WriteFailed

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "MEDIAGATE_USAGE_WRITER_DATABASE_URL"
# A batch whose child died is sent again after these pauses (seconds), to new children.
RESEND_PAUSES = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)
STOP_SECONDS = 5.0  # a child that has not exited this long after its pipe closed is killed
FORGET_EVERY = 600.0  # seconds between deletions of old batch ids
_HEADER = struct.Struct(">I")


class WriterLost(Exception):
    """Batch after batch, the child died before answering: whether the batch was written is unknown."""


class ProcessWriter:
    """The parent's side: sends batches to the child and waits for each answer."""

    def __init__(self, database_url: str, *, command: list[str] | None = None):
        self._database_url = database_url
        self._command = command or [sys.executable, "-m", "app.proxy.writer"]
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the child now, so that it is ready for the first batch (it takes a moment to import)."""
        async with self._lock:
            await self._child()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.returncode is None else None

    async def write(self, batch_id: str, items: list) -> None:
        frame = pickle.dumps((batch_id, items), protocol=pickle.HIGHEST_PROTOCOL)
        async with self._lock:
            for pause in RESEND_PAUSES:
                await asyncio.sleep(pause)
                try:
                    process = await self._child()
                    assert process.stdin is not None and process.stdout is not None  # made with pipes
                    process.stdin.write(_HEADER.pack(len(frame)) + frame)
                    await process.stdin.drain()
                    answered_id, error, refused = pickle.loads(await _read_frame(process.stdout))
                except (OSError, asyncio.IncompleteReadError, EOFError) as exc:
                    await self._lost(exc)
                    continue
                if answered_id != batch_id:  # cannot happen with one batch at a time; don't guess
                    await self._lost(RuntimeError(f"answer for {answered_id!r}, not {batch_id!r}"))
                    raise WriterLost(batch_id)
                if error is not None:
                    raise WriteFailed(error, refused=refused)
                return
            raise WriterLost(batch_id)

    async def _child(self) -> asyncio.subprocess.Process:
        if self._process is None:
            self._process = await asyncio.create_subprocess_exec(
                *self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env={**os.environ, DATABASE_URL_ENV: self._database_url})
        return self._process

    async def _lost(self, exc: BaseException) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            process.kill()
        code = await process.wait()
        log.warning("the usage writer (pid %s) died (exit code %s, %r); starting another", process.pid, code, exc)

    async def close(self) -> None:
        async with self._lock:
            await self._stop_child()

    async def _stop_child(self) -> None:
        """Let the child exit: it has answered every batch it was sent, so it has nothing left."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=STOP_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _read_frame(stream: asyncio.StreamReader) -> bytes:
    (size,) = _HEADER.unpack(await stream.readexactly(_HEADER.size))
    return await stream.readexactly(size)


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def _answer(answers: BinaryIO, batch_id: str, error: str | None, refused: bool = False) -> None:
    answer = pickle.dumps((batch_id, error, refused), protocol=pickle.HIGHEST_PROTOCOL)
    answers.write(_HEADER.pack(len(answer)) + answer)
    answers.flush()


def main() -> None:
    """The child: apply each batch read from stdin in one transaction, answer on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Answers go to the original stdout; anything else printed goes to stderr, not into the pipe.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s [usage writer] %(message)s")

    from sqlalchemy.exc import DataError, IntegrityError

    from app.core.db import make_engine
    from app.proxy.settlement import forget_batches, write

    engine = make_engine(os.environ[DATABASE_URL_ENV], pool_size=1)
    batches = sys.stdin.buffer
    forgot_at = 0.0
    while (header := _read_exactly(batches, _HEADER.size)) is not None:
        body = _read_exactly(batches, _HEADER.unpack(header)[0])
        if body is None:
            break
        batch_id, items = pickle.loads(body)
        error, refused = None, False
        try:
            with engine.begin() as conn:
                write(conn, items, batch_id)
        except Exception as exc:
            log.warning("usage batch %s rolled back", batch_id, exc_info=True)
            # A constraint or a value the database refuses stays refused; anything else
            # (the connection, the server, a lock) may pass when the batch comes again.
            error, refused = repr(exc), isinstance(exc, (IntegrityError, DataError))
        _answer(answers, batch_id, error, refused)
        if time.monotonic() - forgot_at >= FORGET_EVERY:
            forgot_at = time.monotonic()
            try:
                with engine.begin() as conn:
                    forget_batches(conn)
            except Exception:
                log.warning("deleting old usage batch ids failed", exc_info=True)
    engine.dispose()


if __name__ == "__main__":
    main()
