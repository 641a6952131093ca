"""Hold pools share a balance out exactly, and a stopping gateway writes what it owes."""

from __future__ import annotations

import asyncio

import httpx

from app.proxy.holds import HoldPool
from app.proxy.recorder import Release, UsageRecorder
from tests.proxy.conftest import money_state, usage_rows
from tests.servers import ThreadedServer


def end_call(pool: HoldPool, recorder: UsageRecorder, account_id: int, amount: int) -> None:
    """What the proxy does when a call ends: the pool lets go, the recorder releases it (with no cost here)."""
    pool.finish(account_id, amount)
    recorder.record(Release(account_id, amount))


def test_a_small_balance_is_shared_out_exactly(make_account, engine):
    account = make_account(balance="0.000010")  # 10,000 nano-dollars

    async def scenario():
        recorder = UsageRecorder(engine)
        recorder.start()
        pool = HoldPool(engine, recorder)
        # Blocks of 16 calls can't be had; each call then gets exactly what it needs.
        taken = [await pool.take(account.id, 3_000) for _ in range(4)]
        assert taken == [True, True, True, False]
        assert money_state(engine, account.id)[1] == 9_000
        assert await pool.take(account.id, 1_000) is True  # what is left still fits
        assert await pool.take(account.id, 1) is False
        for amount in (3_000, 3_000, 3_000, 1_000):
            end_call(pool, recorder, account.id, amount)
        await pool.stop()
        await recorder.stop()

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (10_000, 0, 10_000)


def test_a_big_balance_is_held_in_blocks_and_given_back(make_account, engine):
    account = make_account(balance="10")

    async def scenario():
        recorder = UsageRecorder(engine)
        recorder.start()
        pool = HoldPool(engine, recorder)
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
        await pool.stop()  # the unused rest goes back
        await recorder.stop()

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (10**10, 0, 10**10)


def test_stopping_the_gateway_writes_queued_usage_and_returns_holds(database, llm_upstream, make_account, engine):
    from app.main import create_app

    account = make_account()
    with ThreadedServer(create_app(), log_level="critical") as server:
        response = httpx.post(server.url + "/v1/chat/completions", headers=account.headers,
                              json={"model": "gpt-4o", "messages": [{"role": "user", "content": "[in:4] [out:2]"}]})
        assert response.status_code == 200
    # The server is stopped: the record is written, the pool's block handed back.
    record = usage_rows(engine, account.id, timeout=0)[0]
    assert record.cost == 30_000  # 4 x $2.50 + 2 x $10 per 1M tokens
    assert money_state(engine, account.id) == (10**10 - 30_000, 0, 10**10 - 30_000)
