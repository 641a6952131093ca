"""Hold pools share a balance out exactly, a stopping gateway writes what it owes, and a
process that dies leaves nothing held for good: its leases run out and the sweep gives them back."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from datetime import timedelta

import httpx
from sqlalchemy import select

from app.core import ledger
from app.core.models import LedgerEntry, LLMHold, utcnow
from app.proxy.holds import HoldPool
from app.proxy.recorder import UsageRecorder
from app.proxy.settlement import Release
from app.proxy.writer import ProcessWriter
from tests.proxy.conftest import money_state, url_of, usage_rows
from tests.servers import ThreadedServer
from workers.tasks import release_expired_holds, sweep


@contextlib.asynccontextmanager
async def running(engine, **options):
    """A hold pool and its usage recorder, as one web process has them; both stop at the end
    (the pool hands back what it holds, the recorder writes what is queued)."""
    recorder = UsageRecorder(ProcessWriter(url_of(engine)))
    recorder.start()
    pool = HoldPool(engine, recorder, **options)
    try:
        yield pool, recorder
    finally:
        await pool.stop()
        await recorder.stop()


def end_call(pool: HoldPool, recorder: UsageRecorder, account_id: int, amount: int) -> None:
    """What the proxy does when a call ends: the pool lets go, the recorder releases it (with no cost here)."""
    recorder.record(Release(account_id, pool.finish(account_id, amount), owner=pool.owner))


def test_a_small_balance_is_shared_out_exactly(make_account, engine):
    account = make_account(balance="0.000010")  # 10,000 nano-dollars

    async def scenario():
        async with running(engine) as (pool, recorder):
            # Blocks of 16 calls can't be had; each call then gets exactly what it needs.
            taken = [await pool.take(account.id, 3_000) for _ in range(4)]
            assert taken == [True, True, True, False]
            assert money_state(engine, account.id)[1] == 9_000
            assert await pool.take(account.id, 1_000) is True  # what is left still fits
            assert await pool.take(account.id, 1) is False
            for amount in (3_000, 3_000, 3_000, 1_000):
                end_call(pool, recorder, account.id, amount)

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (10_000, 0, 10_000)


def test_a_big_balance_is_held_in_blocks_and_given_back(make_account, engine):
    account = make_account(balance="10")

    async def scenario():
        async with running(engine) as (pool, recorder):
            assert await pool.take(account.id, 1_000)
            assert money_state(engine, account.id)[1] == 16_000  # a block for 16 such calls
            for _ in range(15):
                assert await pool.take(account.id, 1_000)
            assert money_state(engine, account.id)[1] == 16_000  # no database round trip for those
            for _ in range(16):
                end_call(pool, recorder, account.id, 1_000)
            await recorder.flush()
            assert await pool.take(account.id, 1_000)  # a busy pool's next block is twice as big
            assert money_state(engine, account.id)[1] == 32_000
            end_call(pool, recorder, account.id, 1_000)

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (10**10, 0, 10**10)


def test_a_busy_pool_fetches_its_next_block_before_running_dry(make_account, engine):
    account = make_account(balance="10")

    def served_from_memory(pool: HoldPool) -> bool:
        """Take a call's hold; True if that finished at once, without waiting on anything."""
        step = pool.take(account.id, 1_000)
        try:
            step.send(None)
        except StopIteration as done:
            return done.value is True
        step.close()
        return False

    async def scenario():
        async with running(engine) as (pool, recorder):
            assert await pool.take(account.id, 1_000)  # the first block: 16 calls
            assert all(served_from_memory(pool) for _ in range(12))  # 3 calls' worth left: under a quarter
            refill = pool._pools[account.id].refill
            assert refill is not None
            await refill
            assert money_state(engine, account.id)[1] == 48_000  # the next, doubled block is there already
            assert all(served_from_memory(pool) for _ in range(30))
            for _ in range(43):
                end_call(pool, recorder, account.id, 1_000)

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (10**10, 0, 10**10)


def test_a_pool_stops_fetching_ahead_once_the_balance_has_nothing_left(make_account, engine):
    account = make_account(balance="0.0001")  # 100 calls of 1,000 nano-dollars

    async def scenario():
        async with running(engine) as (first, first_recorder), running(engine) as (second, second_recorder):
            assert await first.take(account.id, 1_000)  # a block of 16 calls
            taken = 0
            while await second.take(account.id, 1_000):  # the other process takes all the rest
                taken += 1
            assert taken == 84
            holds = []
            database_hold = first._hold
            first._hold = lambda *args: holds.append(args) or database_hold(*args)
            for _ in range(15):  # the first process's block still serves its calls
                assert await first.take(account.id, 1_000)
                await asyncio.sleep(0.01)  # time for a refill to run
            assert len(holds) == 1  # one try to fetch ahead found nothing; it did not try again per call
            assert not await first.take(account.id, 1_000)
            for _ in range(16):
                end_call(first, first_recorder, account.id, 1_000)
            for _ in range(84):
                end_call(second, second_recorder, account.id, 1_000)

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (100_000, 0, 100_000)


def test_one_process_s_block_leaves_most_of_a_balance_to_the_others(make_account, engine):
    """Two web processes on one account: the first one's unused block can't starve the second."""
    account = make_account(balance="0.000020")  # 20 calls of 1,000 nano-dollars

    async def scenario():
        async with running(engine) as (first, first_recorder), running(engine) as (second, second_recorder):
            assert await first.take(account.id, 1_000)
            end_call(first, first_recorder, account.id, 1_000)
            await first_recorder.flush()
            # A 16-call block would leave 4 calls to the other process; at most a quarter is taken.
            assert money_state(engine, account.id)[1] == 4_000
            served = 0
            while await second.take(account.id, 1_000):
                served += 1
            assert served == 16  # all but the first process's idle 4,000
            for _ in range(served):
                end_call(second, second_recorder, account.id, 1_000)

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (20_000, 0, 20_000)


def test_stopping_the_gateway_writes_queued_usage_and_returns_holds(database, llm_upstream, make_account, engine):
    from app.http.app import create_app

    account = make_account()
    with ThreadedServer(create_app(), log_level="critical") as server:
        response = httpx.post(server.url + "/v1/chat/completions", headers=account.headers,
                              json={"model": "gpt-4o", "messages": [{"role": "user", "content": "[in:4] [out:2]"}]})
        assert response.status_code == 200
    # The server is stopped: the record is written, the pool's block handed back.
    record = usage_rows(engine, account.id, timeout=0)[0]
    assert record.cost == 30_000  # 4 x $2.50 + 2 x $10 per 1M tokens
    assert money_state(engine, account.id) == (10**10 - 30_000, 0, 10**10 - 30_000)


# Leases: a process that dies keeps nothing held for good.

def hold_rows(engine, account_id: int) -> list:
    with engine.connect() as conn:
        return conn.execute(select(LLMHold).where(LLMHold.account_id == account_id)).all()


def ledger_rows(engine, account_id: int) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(LedgerEntry.id).where(LedgerEntry.account_id == account_id)).all())


def test_a_killed_process_s_holds_expire_and_the_sweep_gives_them_back_once(make_account, engine):
    account = make_account(balance="0.000010")  # 10,000 nano-dollars

    async def killed_process():
        # Holds taken, then nothing more: no renewal, no settlement, no shutdown (SIGKILL).
        pool = HoldPool(engine, UsageRecorder(ProcessWriter(url_of(engine))), lease_seconds=1.0)
        assert [await pool.take(account.id, 3_000) for _ in range(3)] == [True] * 3
        return pool.owner

    owner = asyncio.run(killed_process())
    [row] = hold_rows(engine, account.id)
    assert (row.owner, row.amount) == (owner, 9_000)
    assert money_state(engine, account.id) == (10_000, 9_000, 10_000)
    release_expired_holds(engine)  # the lease still runs: nothing is released
    assert money_state(engine, account.id)[1] == 9_000

    time.sleep(1.1)
    assert sweep()["holds"] >= 1  # the periodic Celery sweep, run here
    assert money_state(engine, account.id) == (10_000, 0, 10_000)
    assert hold_rows(engine, account.id) == [] and ledger_rows(engine, account.id) == 1  # the top-up only
    release_expired_holds(engine)  # again: there is nothing left to give back
    assert money_state(engine, account.id) == (10_000, 0, 10_000)

    async def next_process():  # the whole balance can be held again
        async with running(engine) as (pool, recorder):
            assert await pool.take(account.id, 10_000)
            end_call(pool, recorder, account.id, 10_000)

    asyncio.run(next_process())
    assert money_state(engine, account.id) == (10_000, 0, 10_000) and hold_rows(engine, account.id) == []


def test_a_live_process_renews_its_leases(make_account, engine):
    account = make_account(balance="1")

    async def scenario():
        async with running(engine, lease_seconds=1.0, renew_seconds=0.1, lease_margin=0.5) as (pool, recorder):
            pool.start()
            assert await pool.take(account.id, 1_000)  # a long call: its pool stays
            held = money_state(engine, account.id)[1]
            for _ in range(5):  # two leases' time, sweeping all along
                await asyncio.sleep(0.4)
                await asyncio.to_thread(release_expired_holds, engine)
                assert money_state(engine, account.id)[1] == held
            [row] = hold_rows(engine, account.id)
            assert row.owner == pool.owner and row.expires_at > utcnow()
            assert await pool.take(account.id, 1_000)  # still served from the pool, still under the same owner
            assert money_state(engine, account.id)[1] == held
            for _ in range(2):
                end_call(pool, recorder, account.id, 1_000)

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (10**9, 0, 10**9)
    assert hold_rows(engine, account.id) == []  # a clean stop deletes its rows


def test_a_stalled_process_that_lost_its_lease_releases_nothing_twice(make_account, engine):
    account = make_account(balance="0.000010")

    async def scenario():
        async with running(engine, lease_seconds=0.5, lease_margin=0.2) as (pool, recorder):  # no renewals: stalled
            first_owner = pool.owner
            assert await pool.take(account.id, 6_000)
            await asyncio.sleep(0.6)
            await asyncio.to_thread(release_expired_holds, engine)  # the sweep takes it for dead
            assert money_state(engine, account.id)[1] == 0
            # The next call finds the lease gone before using the pool: it starts over as a new owner
            # and holds anew. The first call's hold was released by the sweep, so its end releases nothing.
            assert await pool.take(account.id, 4_000)
            assert pool.owner != first_owner
            assert money_state(engine, account.id)[1] == 4_000
            # 10,000 - 4,000 free: the sweep's 6,000 is not promised twice
            assert not await pool.take(account.id, 6_001)
            end_call(pool, recorder, account.id, 6_000)
            await recorder.flush()
            assert money_state(engine, account.id)[1] == 4_000
            end_call(pool, recorder, account.id, 4_000)

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (10_000, 0, 10_000) and hold_rows(engine, account.id) == []


def test_concurrent_sweeps_and_a_renewal_release_each_hold_once(make_account, engine):
    accounts = [make_account(balance="1").id for _ in range(40)]
    past = utcnow() - timedelta(seconds=1)
    with engine.begin() as conn:
        for account_id in accounts:  # every account: a dead process's hold and a late live one's, both expired
            assert ledger.hold(conn, account_id, 700, owner="dead-process", expires_at=past)
            assert ledger.hold(conn, account_id, 300, owner="late-process", expires_at=past)
    start = threading.Barrier(3)
    renewed: set[int] = set()

    def sweeper():
        start.wait()
        release_expired_holds(engine)

    def renewer():
        start.wait()
        with engine.begin() as conn:
            renewed.update(ledger.renew_holds(conn, "late-process", accounts, utcnow() + timedelta(seconds=60)))

    threads = [threading.Thread(target=sweeper), threading.Thread(target=sweeper), threading.Thread(target=renewer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for account_id in accounts:
        rows = {row.owner: row.amount for row in hold_rows(engine, account_id)}
        # Released once (held would go below its rows otherwise); renewed rows were not released.
        assert rows == ({"late-process": 300} if account_id in renewed else {})
        assert money_state(engine, account_id) == (10**9, sum(rows.values()), 10**9)
    with engine.begin() as conn:
        ledger.release_holds(conn, ["late-process"])
    assert all(money_state(engine, account_id)[1] == 0 for account_id in accounts)
