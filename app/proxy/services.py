"""The LLM passthrough's long-lived parts: one connection pool per upstream, the hold pool and
the usage recorder.

Made and closed by the app's lifespan; handlers reach it as `services(request).llm`. The
pools are app.proxy.client's, chosen by measurement over aiohttp's and httpx's clients
(docs/performance.md).
"""

from __future__ import annotations

from app.core.catalog import Catalog, Provider
from app.core.db import make_engine
from app.proxy.channels import Cooldowns
from app.proxy.client import Pool
from app.proxy.egress import proxy_for
from app.proxy.formats import FORMATS
from app.proxy.holds import HoldPool
from app.proxy.recorder import UsageRecorder
from app.proxy.writer import ProcessWriter

CONNECT_TIMEOUT = 15.0
# Longest silence allowed between two reads from an upstream (a model thinking
# before its first token); a provider's `timeout` in the catalog overrides it.
READ_TIMEOUT = 600.0
# The longest a usage listing waits for this process's unwritten records (a stalled writer).
LISTING_WAIT = 2.0


def make_pools(catalog: Catalog, https_proxy: str | None, no_proxy: str) -> dict[str, Pool]:
    """A connection pool for each provider of an LLM model, by provider name. No cookies are
    kept or sent: a pool serves every account's calls."""
    pools: dict[str, Pool] = {}
    for provider in (channel.provider for model in catalog.of_api(*FORMATS) for channel in model.channels):
        if provider.name not in pools:
            pools[provider.name] = Pool(
                provider.base_url, connect_timeout=CONNECT_TIMEOUT, read_timeout=provider.timeout or READ_TIMEOUT,
                proxy=proxy_for(provider.base_url, https_proxy, no_proxy))
    return pools


class LLMServices:
    def __init__(self, database_url: str, catalog: Catalog, *, https_proxy: str | None = None,
                 no_proxy: str = "", drain_seconds: float = 5.0, failover_attempts: int = 3,
                 cooldowns: Cooldowns | None = None):
        self.catalog = catalog
        # How many of a model's channels a call tries, and which are cooling down (app.proxy.channels).
        self.failover_attempts = failover_attempts
        self.cooldowns = cooldowns or Cooldowns()
        # How long a call whose client left is read on for the upstream's usage (Settings).
        self.drain_seconds = drain_seconds
        self.https_proxy, self.no_proxy = https_proxy, no_proxy
        # Hold top-ups and renewals run as sync transactions in a worker thread: one thread hop per
        # transaction instead of one per statement. A pool of their own: nothing else may hold up
        # a renewal (a lease lost gives the holds back) or a top-up (calls wait on it).
        self.engine = make_engine(database_url, pool_size=2)
        # Settlements and usage records are written by a child process (app.proxy.writer).
        self.recorder = UsageRecorder(ProcessWriter(database_url))
        self.holds = HoldPool(self.engine, self.recorder)
        self._pools: dict[str, Pool] = {}

    async def start(self) -> None:
        self._pools = make_pools(self.catalog, self.https_proxy, self.no_proxy)
        self.recorder.start()
        self.holds.start()

    def pool(self, provider: Provider) -> Pool:
        return self._pools[provider.name]

    async def written(self) -> None:
        """Until what this process has answered is written, so a listing made right after a call
        shows it (a call served by another web process shows within a batch). A stalled writer
        is waited for `LISTING_WAIT` at most."""
        await self.recorder.flush(timeout=LISTING_WAIT)

    async def stop(self) -> None:
        await self.holds.stop()  # hands back what the pools hold, through the recorder
        await self.recorder.stop()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self.engine.dispose()
