"""Concurrency: submissions racing for one balance, and 200 slow generations in flight on one worker."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from app.core import ledger
from app.core.models import ImageTask
from tests.servers import ThreadedServer


@pytest.fixture(scope="module")
def gateway(database):
    from app.http.app import create_app

    with ThreadedServer(create_app(), limit_concurrency=1000, backlog=2048) as server:
        yield server.url


async def _post_many(url: str, headers: dict, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as http:
        return await asyncio.gather(*(http.post("/v1/images/generations", json=b) for b in bodies))


def test_50_concurrent_submissions_against_a_balance_for_10_accept_exactly_10(gateway, engine, make_account):
    poor = make_account(balance="0.12")  # ten 1k gpt-image-2 tasks at 0.012
    bodies = [{"model": "gpt-image-2", "prompt": f"race {i} [sleep:3]"} for i in range(50)]
    # [sleep:3]: should a worker pick these up, they neither end nor refund during the race (a refund
    # would free balance for a later submission and make more than 10 acceptable).
    responses = asyncio.run(_post_many(gateway, poor.headers, bodies))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(202) == 10, statuses
    assert statuses.count(402) == 40
    assert all(r.json()["error"]["code"] == "insufficient_balance" for r in responses if r.status_code == 402)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ImageTask)
                            .where(ImageTask.account_id == poor.id)).scalar_one() == 10
        assert ledger.balance(conn, poor.id) >= 0
        assert ledger.balance(conn, poor.id) == ledger.ledger_sum(conn, poor.id)


@pytest.mark.timeout(180)
def test_200_slow_generations_are_in_flight_at_once_on_one_worker(gateway, worker, fake_images, make_account,
                                                                  engine):
    rich = make_account(balance="100")
    tag = uuid.uuid4().hex[:8]
    # [hold:200]: each call waits at the fake until 200 are in flight together, then takes 2 s more.
    bodies = [{"model": "gpt-image-2", "prompt": f"[hold:200][sleep:2] slow {tag} {i}"} for i in range(200)]
    fake_images.reset_peak()
    started = time.monotonic()
    responses = asyncio.run(_post_many(gateway, rich.headers, bodies))
    assert all(r.status_code == 202 for r in responses)
    ids = [r.json()["task_id"] for r in responses]
    deadline = started + 90
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            done = conn.execute(select(func.count()).select_from(ImageTask)
                                .where(ImageTask.id.in_(ids), ImageTask.status == "completed")).scalar_one()
        if done == 200:
            break
        time.sleep(0.25)
    elapsed = time.monotonic() - started
    assert done == 200, f"{done} of 200 completed in {elapsed:.1f}s"
    assert fake_images.max_in_flight >= 200, fake_images.max_in_flight
    assert elapsed < 45, elapsed  # one at a time would be 400 s
