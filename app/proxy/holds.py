"""Holds for calls in flight, taken from the database in blocks.

Every call reserves the most it can cost before it is forwarded. Reserving
each one with its own UPDATE costs a database round trip per request on the
hot path, so each process keeps, per account, a pool of balance it has already
held in the database (`accounts.held`, through `ledger.hold`) and carves
calls' holds out of it in memory. A pool that runs short is topped up with a
block big enough for the next calls, but beyond what the asking call needs a
block takes at most a quarter of the free balance (`ledger.hold`): near the end
of a balance the blocks shrink to what each call needs, and most of what is
left stays free for the account's calls in other web processes. A pool with a
quarter of its last block left fetches the next one in the background, so a
steady stream of calls doesn't wait on the database at all. Nothing is
reserved that the database did not hold first, so concurrent calls can never
together promise more than the balance.

When a call ends, its hold leaves the pool and the usage recorder releases it
in the database as it settles the call. A pool left idle is handed back.

Crash safety: what a process holds is a row per account in `llm_holds`, owned
by the process (a fresh owner id each start) under a lease. The sweeper task
renews the leases of its pools every RENEW_SECONDS, off the hot path; a process
killed outright stops renewing, and the periodic Celery sweep hands its rows
back once they expire (`ledger.release_expired_holds`). A pool only trusts its
lease until LEASE_MARGIN before it runs out: past that it renews it before
serving another call, so a live process never carves calls out of a hold the
sweep may already have given back. Should that happen anyway (the process
stalled for a whole lease, or clocks disagree by more than the margin), the
process treats itself as restarted: it takes a new owner id, counts what its
calls in flight held as released, and its old rows expire like a dead process's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine

from app.core import ledger
from app.core.models import utcnow
from app.proxy.recorder import Release, UsageRecorder

log = logging.getLogger(__name__)

# A top-up holds room for this many calls like the one asking; a busy pool's
# blocks double up to the maximum, so a steady stream of calls rarely waits on the database.
# A top-up runs in a thread, and its Python half holds the GIL the event loop needs: big blocks
# mean few top-ups under load (docs/performance.md has what 256- and 4096-call blocks served).
# The cap below, a quarter of the free balance, still keeps blocks small wherever the balance is.
BLOCK_CALLS, MAX_BLOCK_CALLS = 16, 4096
# Beyond what the asking call needs, a block takes at most 1/BLOCK_SHARE of the free balance.
BLOCK_SHARE = 4
# When less than 1/REFILL_AT of its last block is left, a pool fetches the next in the background.
REFILL_AT = 4
IDLE_SECONDS = 2.0  # an unused pool goes back to the balance after this long
# A process's hold rows live this long unless renewed, which it does every RENEW_SECONDS; a
# killed process's holds come back within LEASE_SECONDS plus one Celery sweep interval.
LEASE_SECONDS, RENEW_SECONDS = 60.0, 15.0
# A pool stops trusting its lease this long before it runs out (renewals missed, clock skew).
LEASE_MARGIN = 15.0


def new_owner() -> str:
    """An id for this process's hold rows: where it runs, for operators, and unique."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(6)}"


@dataclass
class _Pool:
    total: int = 0  # held in the database for this process
    in_flight: int = 0  # the part of it that calls in flight hold
    used_at: float = 0.0
    block_calls: int = BLOCK_CALLS
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    has_row: bool = False  # this owner has a hold row for the account, renewed while the pool lives
    trusted_until: float = 0.0  # monotonic time until which the row's lease surely holds
    lost: int = 0  # the part of in_flight held under a lease that was lost: nothing to release for it
    low_water: int = 0  # below this much free, the next block is fetched in the background
    refill: asyncio.Task | None = None

    @property
    def free(self) -> int:
        return self.total - self.in_flight


class HoldPool:
    def __init__(self, engine: Engine, recorder: UsageRecorder, *, lease_seconds: float | None = None,
                 renew_seconds: float | None = None, lease_margin: float | None = None,
                 idle_seconds: float = IDLE_SECONDS):
        self._engine = engine
        self._recorder = recorder
        self.idle_seconds = idle_seconds  # an unused pool goes back to the balance after this long
        self._pools: dict[int, _Pool] = {}
        self._sweeper: asyncio.Task | None = None
        self._lease = LEASE_SECONDS if lease_seconds is None else lease_seconds
        self._renew_every = RENEW_SECONDS if renew_seconds is None else renew_seconds
        self._margin = LEASE_MARGIN if lease_margin is None else lease_margin
        self.owner = new_owner()  # whose hold rows this process's calls and releases settle
        self._owners = [self.owner]  # every owner id this process has held under
        self._renewed_at = time.monotonic()

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="hold-pool-sweeper")

    async def take(self, account_id: int, amount: int) -> bool:
        """Hold `amount` for a call; False when the balance can't cover it."""
        pool = self._pools.get(account_id)
        if pool is None:
            pool = self._pools[account_id] = _Pool()
        pool.used_at = now = time.monotonic()
        if pool.free >= amount and now < pool.trusted_until:
            pool.in_flight += amount
            if pool.free < pool.low_water and pool.refill is None and not pool.lock.locked():
                pool.refill = asyncio.create_task(self._refill(account_id, pool, amount))
            return True
        async with pool.lock:  # one top-up at a time; the others wait and look again
            if pool.has_row and time.monotonic() >= pool.trusted_until:
                await self._renew({account_id: pool})
            while pool.free < amount:
                need = amount - pool.free
                block = max(need, amount * pool.block_calls - pool.free)
                got = await self._top_up(pool, account_id, need, block)
                if got is None:
                    continue  # the lease was lost meanwhile and the pool starts over; look again
                if not got:
                    return False
                if got >= block:
                    pool.block_calls = min(pool.block_calls * 2, MAX_BLOCK_CALLS)
            pool.in_flight += amount
            return True

    async def _refill(self, account_id: int, pool: _Pool, amount: int) -> None:
        """Fetch the next block while the pool still has some left, so a steady stream of
        calls never waits on the database (a top-up commits to disk: milliseconds)."""
        try:
            async with pool.lock:
                if (self._pools.get(account_id) is not pool or pool.free >= pool.low_water
                        or time.monotonic() >= pool.trusted_until):
                    return  # given back, topped up meanwhile, or the lease needs renewing: calls see to it
                block = amount * pool.block_calls
                got = await self._top_up(pool, account_id, amount, block)
                if got == 0:
                    pool.low_water = 0  # the balance is nearly spent: no more fetching ahead
                elif got and got >= block:
                    pool.block_calls = min(pool.block_calls * 2, MAX_BLOCK_CALLS)
        except Exception:  # the database is away: the next call that runs short tries again
            log.warning("topping up the hold pool of account %s failed", account_id, exc_info=True)
        finally:
            pool.refill = None

    async def _top_up(self, pool: _Pool, account_id: int, need: int, block: int) -> int | None:
        """Hold at least `need` and up to `block` more in the database for the pool: what was
        held, 0 if the balance can't cover `need`, None if the lease was lost meanwhile."""
        owner, started = self.owner, time.monotonic()
        got = await asyncio.to_thread(self._hold, account_id, need, block, owner)
        if not got:
            return 0
        if owner != self.owner:
            return None  # held under the lost owner: its row expires and the sweep gives it back
        pool.total += got
        pool.low_water = got // REFILL_AT if got > need else 0  # exact grants: the balance is nearly spent
        pool.has_row = True
        pool.trusted_until = started + self._lease - self._margin
        return got

    def _expiry(self) -> datetime:
        return utcnow() + timedelta(seconds=self._lease)

    def _hold(self, account_id: int, need: int, block: int, owner: str) -> int:
        with self._engine.begin() as conn:
            return ledger.hold(conn, account_id, need, owner=owner, expires_at=self._expiry(), up_to=block,
                               share=BLOCK_SHARE)

    def finish(self, account_id: int, amount: int) -> int:
        """The call holding `amount` ended; returns the part the recorder must release in the
        database as it settles the call (all of it, unless it was held under a lost lease)."""
        pool = self._pools[account_id]
        pool.in_flight -= amount
        pool.total -= amount
        lost = min(amount, pool.lost)
        pool.lost -= lost
        return amount - lost

    def give_back(self, *, idle_for: float | None = None) -> None:
        """Hand back pools unused for `idle_for` seconds (default `idle_seconds`; 0: all idle ones).

        The hold row stays, at zero; no longer renewed, the sweep removes it."""
        idle_for = self.idle_seconds if idle_for is None else idle_for
        now = time.monotonic()
        for account_id, pool in list(self._pools.items()):
            if pool.in_flight == 0 and now - pool.used_at >= idle_for and not pool.lock.locked():
                if pool.total:
                    self._recorder.record(Release(account_id, pool.total, owner=self.owner))
                del self._pools[account_id]

    async def renew(self) -> None:
        """Extend the leases of all pools' hold rows."""
        started = time.monotonic()
        await self._renew({account_id: pool for account_id, pool in self._pools.items() if pool.has_row})
        self._renewed_at = started

    async def _renew(self, pools: dict[int, _Pool]) -> None:
        if not pools:
            return
        owner, started = self.owner, time.monotonic()
        renewed = await asyncio.to_thread(self._renew_sync, owner, list(pools))
        if owner != self.owner:
            return  # the lease was lost meanwhile, and the pools reset
        trusted_until = started + self._lease - self._margin
        lost = False
        for account_id, pool in pools.items():
            if self._pools.get(account_id) is not pool or not pool.has_row:
                continue  # given back meanwhile
            if account_id in renewed:
                pool.trusted_until = max(pool.trusted_until, trusted_until)
            else:
                lost = True
        if lost:
            self._lose_lease()

    def _renew_sync(self, owner: str, account_ids: list[int]) -> set[int]:
        with self._engine.begin() as conn:
            return ledger.renew_holds(conn, owner, account_ids, self._expiry())

    def _lose_lease(self) -> None:
        """The sweep gave back a hold of this live process: start over as a new owner.

        Calls in flight keep going; what they held is counted as released already. The old
        owner's other rows are no longer renewed and expire, as a dead process's would."""
        old, self.owner = self.owner, new_owner()
        self._owners.append(self.owner)
        log.warning("hold lease of %s was lost (not renewed in time); holding as %s from now on", old, self.owner)
        for pool in self._pools.values():
            pool.lost = pool.in_flight
            pool.total = pool.in_flight
            pool.has_row = False
            pool.trusted_until = 0.0

    async def stop(self) -> None:
        """Hand back every pool, and once the recorder has settled what it was given, every
        hold row of this process (what is left in them: calls still in flight, lost writes)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await asyncio.gather(*(pool.refill for pool in self._pools.values() if pool.refill), return_exceptions=True)
        self.give_back(idle_for=0)
        await self._recorder.flush()
        try:
            await asyncio.to_thread(self._release_all)
        except Exception:
            log.warning("could not release the hold rows of %s; they expire", self._owners, exc_info=True)

    def _release_all(self) -> None:
        with self._engine.begin() as conn:
            ledger.release_holds(conn, self._owners)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_seconds / 2, self._renew_every))
            self.give_back()
            if time.monotonic() - self._renewed_at >= self._renew_every:
                try:
                    await self.renew()
                except Exception:  # the database is away: try again at the next turn
                    log.warning("renewing hold leases failed", exc_info=True)
