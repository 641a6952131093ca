"""Engines and transactions, sync (workers, CLI) and async (the web process).

Service code is written once against a sync `Connection`; the web process runs
it inside `AsyncConnection.run_sync`, so SQLite and PostgreSQL, sync and async,
share one implementation.
"""

from __future__ import annotations

import functools
import logging
import operator
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from sqlalchemy import Connection, Engine, Table, create_engine, event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.core.settings import async_database_url

T = TypeVar("T")
log = logging.getLogger(__name__)
# The exception classes a database that is down, unreachable or out of connections raises
# (app.http.app's handlers); `is_outage` tells an outage from the rest of those classes.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    exc.OperationalError, exc.InterfaceError, exc.TimeoutError, psycopg.OperationalError,
    psycopg.InterfaceError, psycopg_pool.PoolTimeout,
)
# PostgreSQL's SQLSTATEs of an outage: connection exceptions, insufficient resources, and the
# shutdowns of operator intervention (57P: admin or crash shutdown, "cannot connect now"). A
# deadlock, a serialization failure or a canceled query (57014) is an OperationalError too, but
# a bug or a conflict, not an outage.
_OUTAGE_SQLSTATES = ("08", "53", "57P")
# SQLite's: the file locked past its busy timeout, a full disk, a file that can't be opened.
_SQLITE_OUTAGES = ("database is locked", "disk", "unable to open")


def is_outage(error: BaseException) -> bool:
    """Whether `error` says the database is unavailable (answer 503, retry later), rather than
    that a statement failed (a bug, answered 500 and logged as one)."""
    if isinstance(error, (psycopg_pool.PoolTimeout, exc.TimeoutError, exc.InterfaceError, psycopg.InterfaceError)):
        return True
    if getattr(error, "connection_invalidated", False):
        return True
    cause = getattr(error, "orig", None) or error
    sqlstate = getattr(cause, "sqlstate", None)
    if isinstance(cause, psycopg.Error):
        # No SQLSTATE: the connection failed before the server said anything.
        return sqlstate is None or sqlstate.startswith(_OUTAGE_SQLSTATES)
    message = str(cause).lower()
    return isinstance(error, exc.OperationalError) and any(part in message for part in _SQLITE_OUTAGES)
# The longest a request waits for a connection of the psycopg pool (a database that is down
# leaves none to be had).
PSYCOPG_POOL_TIMEOUT = 5.0


class OutageLog:
    """Logs a database outage once, not once per request: its first failure with the
    traceback, a line a minute while it lasts, and nothing more; failures after QUIET seconds
    without any are a new outage."""

    QUIET, EVERY = 30.0, 60.0

    def __init__(self) -> None:
        self._first = self._last = self._logged = 0.0
        self._count = 0

    def failed(self, error: BaseException, where: str) -> None:
        now = time.monotonic()
        if not self._count or now - self._last > self.QUIET:
            self._first, self._logged, self._count = now, now, 0
            log.error("the database is unavailable (%s: %s); answering 503 until it is back (logged once per "
                      "outage)", where, error, exc_info=error)
        elif now - self._logged >= self.EVERY:
            self._logged = now
            log.error("the database is still unavailable: %d requests answered 503 in %.0f s", self._count,
                      now - self._first)
        self._count += 1
        self._last = now


def _sqlite_setup(engine: Engine) -> None:
    """WAL, a busy timeout and BEGIN IMMEDIATE: several processes (web, worker)
    write the embedded database, and a deferred transaction that later writes
    would fail with 'database is locked' instead of waiting its turn."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - trivial
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:  # pragma: no cover - trivial
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, pool_size: int = 10, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        _sqlite_setup(engine)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, **kwargs)


def make_async_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    url = async_database_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _sqlite_setup(engine.sync_engine)
        return engine
    # No overflow: a connection opened for a burst and closed after it costs more (connect,
    # DNS lookup in a thread, TLS) than waiting a moment for a pooled one; requests are one
    # or two round trips each.
    return create_async_engine(url, pool_size=pool_size, max_overflow=0)


async def run(engine: AsyncEngine, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn(conn, *args)` in one transaction on the async engine; commit on success."""
    async with engine.begin() as conn:
        return await conn.run_sync(fn, *args, **kwargs)


async def run_single(engine: AsyncEngine, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Like `run`, for work that is one atomic statement on PostgreSQL: no BEGIN/COMMIT
    round trips there (SQLite, where it may be several statements, gets a transaction)."""
    if engine.dialect.name != "postgresql":
        return await run(engine, fn, *args, **kwargs)
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        return await conn.run_sync(fn, *args, **kwargs)


async def open_psycopg_pool(url: str, size: int) -> psycopg_pool.AsyncConnectionPool | None:
    """A psycopg async pool (autocommit) for the PostgreSQL hot paths, or None on other databases.

    The submit is one statement; run through SQLAlchemy it spent more CPU in the
    execution machinery (connection facade, greenlet, execution context) than in
    psycopg itself.
    """
    if not url.startswith("postgresql"):
        return None
    from psycopg_pool import AsyncConnectionPool
    from sqlalchemy.engine import make_url

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pool = AsyncConnectionPool(conninfo, min_size=1, max_size=size, kwargs={"autocommit": True}, open=False,
                               timeout=PSYCOPG_POOL_TIMEOUT)
    await pool.open()
    return pool


def insert_rows(conn: Connection, table: Table, rows: list[dict]) -> None:
    """Insert `rows` (dicts with the same keys) with one prepared statement, executed for each row.

    Values go through each column type's bind processing, as `conn.execute(insert(table), rows)`
    would, without SQLAlchemy's per-row machinery around it: the usage writer spends most
    of its time here. One statement text for any number of rows lets the driver prepare
    it once (sqlite3's statement cache; psycopg sends the rows in one pipeline).
    """
    if not rows:
        return
    dialect = conn.dialect
    names = list(rows[0])
    processed = [(index, process) for index, name in enumerate(names)
                 if (process := table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) is not None]
    quote = dialect.identifier_preparer.quote
    mark = "?" if dialect.paramstyle in ("qmark", "numeric") else "%s"
    sql = (f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in names)}) "
           f"VALUES ({', '.join([mark] * len(names))})")
    values_of = operator.itemgetter(*names)
    params = []
    for row in rows:
        values = list(values_of(row))
        for index, process in processed:
            if values[index] is not None:
                values[index] = process(values[index])
        params.append(tuple(values))
    conn.exec_driver_sql(sql, params)


def insert_unless_exists(conn: Connection, table: Table, key: tuple[str, ...], values: dict) -> bool:
    """Insert a row of `values` unless one with the same `key` columns exists; True if inserted.

    The statement is built once per table (the values come as parameters): the usage
    writer runs two of these in every batch.
    """
    # RETURNING, not rowcount: psycopg 3 with SQLAlchemy 2.1 reports rowcount -1 for this statement.
    return conn.execute(_insert_unless_exists(conn.dialect.name, table, key), values).first() is not None


@functools.lru_cache(maxsize=16)
def _insert_unless_exists(dialect_name: str, table: Table, key: tuple[str, ...]) -> Any:
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=list(key)).returning(*table.primary_key.columns)
