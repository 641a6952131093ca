"""The one place environment variables are read.

`Settings.from_env()` is called once per process (by `get_settings()`); everything
else receives the resulting object.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _floats(value: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
    if not value:
        return default
    return tuple(float(part) for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str | None  # None: the embedded broker (a folder under data_dir)
    catalog_path: Path | None
    public_url: str
    # Connections per process (and as many again in overflow): keep the sum over all
    # processes under PostgreSQL's max_connections.
    db_pool_size: int = 10
    # Image workers
    worker_concurrency: int = 200
    backend_timeout: float = 120.0
    backend_retries: int = 3
    backend_retry_backoff: float = 1.0
    task_lease_seconds: int = 300
    task_max_attempts: int = 3
    # The periodic sweep, and how long a dispatched task may wait unclaimed before it is sent again
    # The broker queue the web process publishes to and workers consume (one per deployment).
    queue: str = "mediagate"
    sweep_interval: float = 15.0
    redispatch_after: float = 60.0
    # Webhooks
    webhook_schedule: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    webhook_timeout: float = 15.0
    webhook_secret_grace: int = 24 * 3600
    allow_private_urls: bool = False
    # API keys are cached this long in each web process; a revoked key stops
    # working within this many seconds.
    key_cache_seconds: float = 5.0
    # When a client leaves an LLM call whose answer has begun, the gateway reads the upstream this
    # long more for its usage (the provider bills the generation); then it charges an estimate.
    usage_drain_seconds: float = 5.0
    # Channels and failover (app.proxy.channels): channels one LLM call tries at most; failures in
    # a row that cool a channel down, and the first cooldown (doubling while it keeps failing).
    failover_attempts: int = 3
    cooldown_failures: int = 3
    cooldown_seconds: float = 30.0
    max_reference_bytes: int = 10 * 1024 * 1024
    # Signs dashboard session cookies. Unset: a random key kept in data_dir/secret_key
    # (shared by the processes on one machine); set it when web processes run on several hosts.
    secret_key: str | None = field(default=None, repr=False)
    # The egress proxy of the LLM passthrough's https upstreams, from the variables the image
    # workers' httpx reads too: HTTPS_PROXY, and NO_PROXY for the hosts reached directly.
    https_proxy: str | None = field(default=None, repr=False)  # may hold a password
    no_proxy: str = ""
    # Slow and idle clients (app/http/serving.py): seconds a client has to send a request's whole
    # header block, from its first byte (or from connecting), and seconds a request body may go
    # without a byte while the server reads it.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # Open client connections per web process; past it a new one gets a 503 and is closed. Each
    # costs a file descriptor (two while it is proxied upstream) and tens of KiB of buffers.
    max_connections: int = 4096
    env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        data_dir = Path(env.get("MEDIAGATE_DATA_DIR") or "./data").resolve()
        database_url = env.get("MEDIAGATE_DATABASE_URL") or f"sqlite:///{data_dir / 'mediagate.db'}"
        catalog = env.get("MEDIAGATE_CATALOG")
        return cls(
            data_dir=data_dir,
            database_url=normalize_database_url(database_url),
            broker_url=env.get("MEDIAGATE_BROKER_URL") or None,
            catalog_path=Path(catalog) if catalog else None,
            public_url=(env.get("MEDIAGATE_PUBLIC_URL") or "http://127.0.0.1:8000").rstrip("/"),
            db_pool_size=int(env.get("MEDIAGATE_DB_POOL_SIZE") or 10),
            worker_concurrency=int(env.get("MEDIAGATE_WORKER_CONCURRENCY") or 200),
            backend_timeout=float(env.get("MEDIAGATE_BACKEND_TIMEOUT") or 120),
            backend_retries=int(env.get("MEDIAGATE_BACKEND_RETRIES") or 3),
            backend_retry_backoff=float(env.get("MEDIAGATE_BACKEND_RETRY_BACKOFF") or 1.0),
            task_lease_seconds=int(env.get("MEDIAGATE_TASK_LEASE_SECONDS") or 300),
            task_max_attempts=int(env.get("MEDIAGATE_TASK_MAX_ATTEMPTS") or 3),
            queue=env.get("MEDIAGATE_QUEUE") or "mediagate",
            sweep_interval=float(env.get("MEDIAGATE_SWEEP_INTERVAL") or 15.0),
            redispatch_after=float(env.get("MEDIAGATE_REDISPATCH_AFTER") or 60.0),
            webhook_schedule=_floats(env.get("MEDIAGATE_WEBHOOK_SCHEDULE"), cls.webhook_schedule),
            webhook_timeout=float(env.get("MEDIAGATE_WEBHOOK_TIMEOUT") or 15.0),
            webhook_secret_grace=int(env.get("MEDIAGATE_WEBHOOK_SECRET_GRACE") or 24 * 3600),
            allow_private_urls=_bool(env.get("MEDIAGATE_ALLOW_PRIVATE_URLS")),
            key_cache_seconds=float(env.get("MEDIAGATE_KEY_CACHE_SECONDS") or 5.0),
            usage_drain_seconds=float(env.get("MEDIAGATE_USAGE_DRAIN_SECONDS") or 5.0),
            failover_attempts=max(1, int(env.get("MEDIAGATE_FAILOVER_ATTEMPTS") or 3)),
            cooldown_failures=max(1, int(env.get("MEDIAGATE_COOLDOWN_FAILURES") or 3)),
            cooldown_seconds=float(env.get("MEDIAGATE_COOLDOWN_SECONDS") or 30.0),
            secret_key=env.get("MEDIAGATE_SECRET_KEY") or None,
            https_proxy=env.get("HTTPS_PROXY") or env.get("https_proxy") or None,
            no_proxy=env.get("NO_PROXY") or env.get("no_proxy") or "",
            header_timeout=float(env.get("MEDIAGATE_HEADER_TIMEOUT") or 10.0),
            body_timeout=float(env.get("MEDIAGATE_BODY_TIMEOUT") or 30.0),
            max_connections=int(env.get("MEDIAGATE_MAX_CONNECTIONS") or 4096),
            env=env,
        )


def normalize_database_url(url: str) -> str:
    """Accept the usual spellings and pick the drivers this project ships."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def async_database_url(url: str) -> str:
    """The URL for the web process's async engine."""
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://"):]
    return url  # psycopg 3 serves both sync and async


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
