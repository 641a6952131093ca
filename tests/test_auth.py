"""API-key authentication: the per-process cache and its single lookup per key."""

import asyncio

from starlette.requests import Request

from app.core.auth import Authenticator


class CountingEngine:
    """Stands in for the async engine: counts lookups and lets them take a while."""

    def __init__(self, found):
        self.found = found
        self.lookups = 0

    def connect(self):
        engine = self

        class Conn:
            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            async def run_sync(self, fn, key):
                engine.lookups += 1
                await asyncio.sleep(0.05)
                return engine.found

        return Conn()


def _request(key: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "query_string": b"",
                    "headers": [(b"authorization", f"Bearer {key}".encode())]})


def test_concurrent_requests_for_an_uncached_key_share_one_lookup():
    engine = CountingEngine(found=(7, 42))
    auth = Authenticator(engine, ttl=5)
    key = "llm_" + "k" * 43

    async def main():
        return await asyncio.gather(*(auth.authenticate(_request(key)) for _ in range(50)))

    principals = asyncio.run(main())
    assert engine.lookups == 1
    assert {(p.account_id, p.key_id) for p in principals} == {(42, 7)}
    asyncio.run(auth.authenticate(_request(key)))  # cached now
    assert engine.lookups == 1


def test_an_unknown_key_is_refused_for_everyone_waiting_on_its_lookup():
    from app.core.errors import APIError

    engine = CountingEngine(found=None)
    auth = Authenticator(engine, ttl=5)

    async def main():
        return await asyncio.gather(*(auth.authenticate(_request("llm_" + "u" * 43)) for _ in range(10)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert engine.lookups == 1
    assert all(isinstance(r, APIError) and r.status == 401 for r in results)
