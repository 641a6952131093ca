"""Holds for calls in flight, taken from the database in blocks.

Every call reserves the most it can cost before it is forwarded. Reserving
each one with its own UPDATE costs a database round trip per request on the
hot path, so each process keeps, per account, a pool of balance it has already
held in the database (`accounts.held`, through `ledger.hold`) and carves
calls' holds out of it in memory. A pool that runs short is topped up with a
block big enough for the next calls; when the balance can't give a block, with
exactly what the call needs, so a small balance is shared out as precisely as
per-call holds would. Nothing is reserved that the database did not hold
first, so concurrent calls can never together promise more than the balance.

When a call ends, its hold leaves the pool and the usage recorder releases it
in the database as it settles the call. A pool left idle is handed back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine

from app import ledger
from app.proxy.recorder import Release, UsageRecorder

# A top-up holds room for this many calls like the one asking; a busy pool's
# blocks double up to the maximum, so a steady stream of calls rarely waits on the database.
BLOCK_CALLS, MAX_BLOCK_CALLS = 16, 64
IDLE_SECONDS = 2.0  # an unused pool goes back to the balance after this long


@dataclass
class _Pool:
    total: int = 0  # held in the database for this process
    in_flight: int = 0  # the part of it that calls in flight hold
    used_at: float = 0.0
    block_calls: int = BLOCK_CALLS
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def free(self) -> int:
        return self.total - self.in_flight


class HoldPool:
    def __init__(self, engine: Engine, recorder: UsageRecorder):
        self._engine = engine
        self._recorder = recorder
        self._pools: dict[int, _Pool] = {}
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="hold-pool-sweeper")

    async def take(self, account_id: int, amount: int) -> bool:
        """Hold `amount` for a call; False when the balance can't cover it."""
        pool = self._pools.get(account_id)
        if pool is None:
            pool = self._pools[account_id] = _Pool()
        pool.used_at = time.monotonic()
        if pool.free >= amount:
            pool.in_flight += amount
            return True
        async with pool.lock:  # one top-up at a time; the others wait and look again
            if pool.free < amount:
                need = amount - pool.free
                block = max(need, amount * pool.block_calls - pool.free)
                if await asyncio.to_thread(self._hold, account_id, block):
                    pool.total += block
                    pool.block_calls = min(pool.block_calls * 2, MAX_BLOCK_CALLS)
                elif block > need and await asyncio.to_thread(self._hold, account_id, need):
                    pool.total += need
                else:
                    return False
            pool.in_flight += amount
            return True

    def _hold(self, account_id: int, amount: int) -> bool:
        with self._engine.begin() as conn:
            return ledger.hold(conn, account_id, amount)

    def finish(self, account_id: int, amount: int) -> None:
        """The call holding `amount` ended; the recorder releases it in the database when it settles."""
        pool = self._pools[account_id]
        pool.in_flight -= amount
        pool.total -= amount

    def give_back(self, *, idle_for: float | None = None) -> None:
        """Hand back pools unused for `idle_for` seconds (default IDLE_SECONDS; 0: all idle ones)."""
        idle_for = IDLE_SECONDS if idle_for is None else idle_for
        now = time.monotonic()
        for account_id, pool in list(self._pools.items()):
            if pool.in_flight == 0 and now - pool.used_at >= idle_for and not pool.lock.locked():
                if pool.total:
                    self._recorder.record(Release(account_id, pool.total))
                del self._pools[account_id]

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.give_back(idle_for=0)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(IDLE_SECONDS / 2)
            self.give_back()
