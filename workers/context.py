"""What a worker process keeps for its life: settings, engine, catalog, storage, one HTTP pool."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import httpx
from sqlalchemy import Engine

from app import storage as storage_module
from app.core import catalog as catalog_module
from app.core import outbound
from app.core.catalog import Catalog, Provider
from app.core.db import make_engine
from app.core.settings import Settings, get_settings
from app.proxy.formats import check
from workers.backends import make_backend
from workers.backends.base import ImageBackend


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    catalog: Catalog
    storage: storage_module.Storage
    http: httpx.Client
    # For user-supplied URLs (webhooks, reference images): connects only to public addresses.
    outbound: httpx.Client
    _backends: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def backend(self, provider: Provider) -> ImageBackend:
        with self._lock:
            if provider.name not in self._backends:
                self._backends[provider.name] = make_backend(provider, self.http)
            return self._backends[provider.name]

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        catalog = catalog_module.load(settings.catalog_path, settings.env)
        check(catalog)  # the same catalog the web process checks: a worker refuses what it would
        return cls(
            settings=settings,
            engine=make_engine(settings.database_url, pool_size=settings.db_pool_size),
            catalog=catalog,
            storage=storage_module.from_settings(settings),
            http=httpx.Client(
                timeout=httpx.Timeout(settings.backend_timeout, connect=10.0),
                limits=httpx.Limits(max_connections=settings.worker_concurrency + 20,
                                    max_keepalive_connections=settings.worker_concurrency),
                follow_redirects=False,
            ),
            outbound=outbound.outbound_client(settings.allow_private_urls, timeout=settings.webhook_timeout,
                                          max_connections=settings.worker_concurrency + 20),
        )


@functools.lru_cache(maxsize=1)
def get_context() -> WorkerContext:
    return WorkerContext.from_settings(get_settings())
