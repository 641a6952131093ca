"""Request -> (account, key), with a short per-process cache.

The hot paths (submit, poll, proxy) never wait on the database for a key they
saw in the last `key_cache_seconds`; a revoked key stops working within that
time. Key use times are collected here and written in batches by the lifespan.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from app.core import keys
from app.core.errors import APIError, unauthorized
from app.core.models import ApiKey, utcnow
from app.core.services import services


@dataclass(frozen=True)
class Principal:
    account_id: int
    key_id: int


def key_from_headers(headers: Mapping[str, str], *, google: bool = False, query_key: str | None = None) -> str | None:
    """The API key a client sent: a bearer token or `x-api-key`, and for Google's clients
    also `x-goog-api-key` or the `key` query parameter (`query_key`)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for header in ("x-api-key", "x-goog-api-key") if google else ("x-api-key",):
        found = headers.get(header)
        if found:
            return found.strip()
    return (query_key or None) if google else None


def key_from_request(request: Request, *, google: bool = False) -> str | None:
    return key_from_headers(request.headers, google=google,
                            query_key=request.query_params.get("key") if google else None)


class Authenticator:
    MAX_ENTRIES = 100_000

    def __init__(self, engine: AsyncEngine, ttl: float):
        self._engine = engine
        self._ttl = ttl
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        # One database lookup per key at a time: requests that find the entry expired
        # while a lookup is under way wait for it instead of each querying.
        self._lookups: dict[str, asyncio.Future] = {}
        self._used: set[int] = set()

    async def authenticate(self, request: Request, *, google: bool = False) -> Principal:
        return await self.check(key_from_request(request, google=google))

    async def check(self, key: str | None) -> Principal:
        """The principal of an API key as the client sent it (None: it sent none)."""
        if not key:
            raise unauthorized()
        if not keys.looks_like_key(key):
            raise unauthorized("Invalid API key. mediagate keys start with 'llm_'.")
        now = time.monotonic()
        # Cached by the key itself: the process sees it on every request anyway, and
        # hashing it each time cost more than the rest of the lookup.
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            lookup = self._lookups.get(key)
            if lookup is None:
                # A task of its own: a client that disconnects mid-lookup cancels only its wait.
                lookup = self._lookups[key] = asyncio.ensure_future(self._lookup(key, now))
                lookup.add_done_callback(lambda done: self._lookup_done(key, done))
            principal = await asyncio.shield(lookup)
        if principal is None:
            raise unauthorized("Invalid or revoked API key.")
        self._used.add(principal.key_id)
        return principal

    async def _lookup(self, key: str, now: float) -> Principal | None:
        async with self._engine.connect() as conn:
            found = await conn.run_sync(keys.lookup, key)
        principal = Principal(account_id=found[1], key_id=found[0]) if found else None
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.clear()
        self._cache[key] = (principal, now + self._ttl)
        return principal

    def _lookup_done(self, key: str, done: asyncio.Future) -> None:
        self._lookups.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: a failed lookup that nobody waits on any more logs nothing

    def forget(self) -> None:
        self._cache.clear()

    def take_used(self) -> set[int]:
        used, self._used = self._used, set()
        return used


def mark_used(conn: Connection, key_ids: set[int]) -> None:
    if key_ids:
        conn.execute(update(ApiKey).where(ApiKey.id.in_(sorted(key_ids))).values(last_used_at=utcnow()))


async def require(request: Request, *, google: bool = False) -> Principal:
    auth = services(request).auth
    return await auth.authenticate(request, google=google)


__all__ = ["APIError", "Authenticator", "Principal", "key_from_headers", "key_from_request", "mark_used", "require"]
