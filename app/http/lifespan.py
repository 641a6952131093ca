"""The web process's lifespan: it builds the long-lived services, starts them, and closes them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from app import storage
from app.core import auth
from app.core.broker import Broker
from app.core.catalog import Catalog
from app.core.db import OutageLog, make_async_engine, make_engine, open_psycopg_pool, run
from app.core.services import Services
from app.core.settings import Settings
from app.dashboard import sessions
from app.proxy.channels import Cooldowns
from app.proxy.services import LLMServices

# Last-used times of API keys are written in a batch this often.
KEY_USE_FLUSH_SECONDS = 30.0
# Collect the youngest generation every this many net allocations instead of Python's 700:
# each request allocates a few hundred short-lived objects, and fewer collections serve more
# passthrough requests (docs/performance.md). Cyclic garbage then lives a little longer.
GC_THRESHOLD = 20_000


async def _flush_key_use(found: Services) -> None:
    while True:
        await asyncio.sleep(KEY_USE_FLUSH_SECONDS)
        used = found.auth.take_used()
        if used:
            with contextlib.suppress(Exception):
                await run(found.engine, auth.mark_used, used)


@contextlib.contextmanager
def _tuned_gc() -> Iterator[None]:
    """While the app serves: what startup made (it lives as long as the process) is moved out of
    the collector's way, and the youngest generation is collected less often. Both are undone
    at shutdown, so a process that runs several apps in turn (the tests) doesn't keep
    everything from before each start frozen for good."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


async def start(settings: Settings, catalog: Catalog) -> Services:
    """The services, started; should any part fail to start, what was started is stopped again."""
    async with contextlib.AsyncExitStack() as undo:
        engine = make_async_engine(settings.database_url, pool_size=settings.db_pool_size)
        undo.push_async_callback(engine.dispose)
        sync_engine = make_engine(settings.database_url, pool_size=2)
        undo.callback(sync_engine.dispose)
        broker = Broker(settings)
        broker.start()
        undo.callback(broker.stop)
        found = await _build(settings, catalog, engine, sync_engine, broker)
        undo.pop_all()
        return found
    raise AssertionError("unreachable")  # pragma: no cover - the stack re-raises what failed


async def _build(settings: Settings, catalog: Catalog, engine: AsyncEngine, sync_engine: Engine,
                 broker: Broker) -> Services:
    llm = LLMServices(settings.database_url, catalog, https_proxy=settings.https_proxy,
                     no_proxy=settings.no_proxy, drain_seconds=settings.usage_drain_seconds,
                     failover_attempts=settings.failover_attempts,
                     cooldowns=Cooldowns(failures=settings.cooldown_failures, seconds=settings.cooldown_seconds))
    found = Services(
        settings=settings, catalog=catalog, engine=engine, sync_engine=sync_engine,
        pg_pool=await open_psycopg_pool(settings.database_url, settings.db_pool_size),
        auth=auth.Authenticator(engine, settings.key_cache_seconds), broker=broker, llm=llm,
        storage=storage.from_settings(settings), outage=OutageLog(),
        signer=sessions.Signer(sessions.secret_key(settings)), limiter=sessions.LoginLimiter())
    try:
        await llm.start()
    except BaseException:
        await llm.stop()
        if found.pg_pool is not None:
            await found.pg_pool.close()
        raise
    return found


async def stop(found: Services) -> None:
    await found.llm.stop()  # writes the usage still queued
    with contextlib.suppress(Exception):
        await run(found.engine, auth.mark_used, found.auth.take_used())
    found.broker.stop()
    if found.pg_pool is not None:
        await found.pg_pool.close()
    await found.engine.dispose()
    found.sync_engine.dispose()


def lifespan(settings: Settings, catalog: Catalog) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """The app's lifespan: the services are in `app.state.services` while it serves."""

    @contextlib.asynccontextmanager
    async def serve(app: Starlette) -> AsyncIterator[None]:
        found = app.state.services = await start(settings, catalog)
        flusher = asyncio.create_task(_flush_key_use(found))
        with _tuned_gc():
            try:
                yield
            finally:
                flusher.cancel()
                await stop(found)

    return serve
