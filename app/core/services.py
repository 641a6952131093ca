"""The web process's long-lived services, built once when the app starts (its lifespan).

Handlers reach them through `services(request)` (or `of_scope(scope)` on the raw ASGI
path), typed, instead of attributes spread over `app.state`. app.http.lifespan builds them:
settings and catalog, engines and pools, the key cache, the broker, the LLM passthrough's
pools, holds and usage recorder, storage, and the dashboard's signer and sign-in limiter.

Database pools a web process opens, and why each:
- `engine`: SQLAlchemy's async engine, for every request's reads and transactions;
- `pg_pool` (PostgreSQL only): a psycopg pool for the submit, one statement with no
  SQLAlchemy machinery around it (the hot path; docs/performance.md);
- `sync_engine`: a small sync engine for the webhook wake-ups after a commit, run in a thread;
- `llm.engine`: the LLM hold pool's own, for its top-ups and lease renewals (a thread hop per
  transaction, not per statement), which nothing else may hold up;
- the usage writer, a child process, opens one of its own (app.proxy.writer).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

from app.core.catalog import Catalog
from app.core.db import OutageLog
from app.core.settings import Settings

if TYPE_CHECKING:  # the types only: the services above core are built by app.http.app
    from psycopg_pool import AsyncConnectionPool
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from app.core.auth import Authenticator
    from app.core.broker import Broker
    from app.dashboard.sessions import LoginLimiter, Signer
    from app.proxy.services import LLMServices
    from app.storage.base import Storage


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    engine: AsyncEngine
    sync_engine: Engine
    pg_pool: AsyncConnectionPool | None
    auth: Authenticator
    broker: Broker
    llm: LLMServices
    storage: Storage
    outage: OutageLog
    signer: Signer  # the dashboard's session cookies
    limiter: LoginLimiter  # the dashboard's sign-in attempts


def services(connection: HTTPConnection) -> Services:
    """The services of the app serving `connection` (a Request)."""
    found: Services = connection.app.state.services
    return found


def of_scope(scope: MutableMapping[str, Any]) -> Services:
    """The same from a raw ASGI scope (the passthrough's front door has no Request)."""
    found: Services = scope["app"].state.services
    return found
