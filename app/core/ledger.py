"""The only code that changes a balance.

Every change is a ledger row written in the same transaction as the balance
update (and, by the caller, as the state change that causes it). Functions take
a sync `Connection` already inside a transaction; the caller commits.

Invariants: accounts.balance == SUM(ledger_entries.amount), and accounts.held ==
SUM(llm_holds.amount), for every account.

Lock order, on PostgreSQL: whatever changes an account's hold rows locks the
account row first (its UPDATE, or `_lock_account`), a transaction touching several
accounts takes them in ascending id order, and a renewal (which touches only hold
rows) locks them in that order too. So holds, settlements, renewals and sweeps
can run at once in any number of processes without deadlocking.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Json
from sqlalchemy import (
    JSON,
    ColumnElement,
    Connection,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.sql.dml import ReturningInsert

from app.core.db import insert_unless_exists
from app.core.models import Account, LedgerEntry, LLMHold, Timestamp, utcnow

TOPUP, CHARGE, REFUND, USAGE = "topup", "charge", "refund", "usage"


class InsufficientBalance(Exception):
    pass


def _insert_once(conn: Connection, **values: Any) -> bool:
    """Insert a ledger row unless one with the same (kind, reference) exists."""
    return insert_unless_exists(conn, LedgerEntry.__table__, ("kind", "reference"), {"created_at": utcnow(), **values})


def top_up(conn: Connection, account_id: int, amount: int, note: str = "") -> None:
    """Add `amount` (> 0) to the balance."""
    if amount <= 0:
        raise ValueError("a top-up must be positive")
    conn.execute(update(Account).where(Account.id == account_id).values(balance=Account.balance + amount))
    conn.execute(insert(LedgerEntry).values(
        account_id=account_id, kind=TOPUP, amount=amount, note=note, created_at=utcnow()))


def charge(conn: Connection, account_id: int, amount: int, *, reference: str, note: str = "") -> None:
    """Debit `amount` up front for `reference` (a task id).

    Raises InsufficientBalance, changing nothing, when the free balance
    (balance - held) is short. The conditional UPDATE takes the row lock, so
    concurrent charges serialize and never overdraw.
    """
    result = conn.execute(
        update(Account)
        .where(Account.id == account_id, Account.balance - Account.held >= amount)
        .values(balance=Account.balance - amount)
    )
    if result.rowcount != 1:
        raise InsufficientBalance()
    conn.execute(insert(LedgerEntry).values(
        account_id=account_id, kind=CHARGE, amount=-amount, reference=reference, note=note,
        created_at=utcnow()))


def charge_with_row(conn: Connection, account_id: int, amount: int, *, reference: str, note: str,
                    table: Table, values: dict) -> None:
    """`charge`, and insert `values` into `table` (the thing paid for), all or nothing.

    Raises InsufficientBalance, writing nothing, when the free balance is short. On
    PostgreSQL it is one statement (data-modifying CTEs: debit, ledger row, row), so
    a caller may run it without BEGIN/COMMIT: one round trip for the whole submit.
    The row is inserted only if the debit happened, in the same atomic statement.
    """
    if conn.dialect.name != "postgresql":
        conn.execute(insert(table).values(**values))
        charge(conn, account_id, amount, reference=reference, note=note)
        return
    params = _charge_with_row_params(account_id, amount, reference, note, values)
    if conn.execute(_charge_with_row_statement(table, tuple(values)), params).first() is None:
        raise InsufficientBalance()


async def charge_with_row_psycopg(connection: AsyncConnection[Any], account_id: int, amount: int, *, reference: str,
                                  note: str, table: Table, values: dict) -> None:
    """`charge_with_row` on PostgreSQL through a psycopg AsyncConnection in autocommit mode:
    the same compiled statement, without SQLAlchemy's per-execution work (the submit hot path)."""
    sql, defaults, json_columns = _charge_with_row_sql(table, tuple(values))
    params = {**defaults, **_charge_with_row_params(account_id, amount, reference, note, values)}
    for name in json_columns:
        params[name] = Json(params[name])
    cursor = await connection.execute(sql, params)
    if await cursor.fetchone() is None:
        raise InsufficientBalance()


def _charge_with_row_params(account_id: int, amount: int, reference: str, note: str, values: dict) -> dict:
    # Parameter names must not match column names: SQLAlchemy would add those to the UPDATE's SET.
    return {"account_id_": account_id, "amount_": amount, "debit_": -amount, "reference_": reference,
            "note_": note, "now_": utcnow(), **{f"row_{k}": v for k, v in values.items()}}


@functools.lru_cache(maxsize=8)
def _charge_with_row_sql(table: Table, columns: tuple[str, ...]) -> tuple[str, dict, tuple[str, ...]]:
    """The statement compiled once for psycopg: (SQL, default parameters, JSON parameters)."""
    compiled = _charge_with_row_statement(table, columns).compile(dialect=psycopg_dialect())
    json_columns = tuple(f"row_{c}" for c in columns if isinstance(table.c[c].type, JSON))
    return str(compiled), dict(compiled.params), json_columns


@functools.lru_cache(maxsize=8)
def _charge_with_row_statement(table: Table, columns: tuple[str, ...]) -> ReturningInsert[Any]:
    debit = (update(Account)
             .where(Account.id == bindparam("account_id_"), Account.balance - Account.held >= bindparam("amount_"))
             .values(balance=Account.balance - bindparam("amount_"))
             .returning(Account.id).cte("debit"))
    entry = (insert(LedgerEntry)
             .from_select(["account_id", "kind", "amount", "reference", "note", "created_at"],
                          select(debit.c.id, literal(CHARGE), bindparam("debit_"), bindparam("reference_"),
                                 bindparam("note_"), bindparam("now_", type_=Timestamp)))
             .returning(LedgerEntry.account_id).cte("entry"))
    row = (insert(table)
           .from_select(list(columns), select(*[bindparam(f"row_{c}", type_=table.c[c].type) for c in columns])
                        .select_from(entry))
           .returning(table.primary_key.columns[0]))
    return row.add_cte(debit).add_cte(entry)


def refund(conn: Connection, account_id: int, amount: int, *, reference: str, note: str = "") -> bool:
    """Give back `amount` for `reference`; True if refunded now, False if it already was."""
    if not _insert_once(conn, account_id=account_id, kind=REFUND, amount=amount, reference=reference, note=note):
        return False
    conn.execute(update(Account).where(Account.id == account_id).values(balance=Account.balance + amount))
    return True


def hold(conn: Connection, account_id: int, amount: int, *, owner: str, expires_at: datetime,
         up_to: int | None = None, share: int = 4) -> int:
    """Reserve at least `amount` of the free balance for `owner`'s requests in flight; returns
    what was reserved, 0 if not even `amount` can be covered.

    `up_to` asks for more, a block for the requests to come; the part beyond `amount`
    never takes more than 1/`share` of the free balance, so one process's block leaves
    most of a small balance to the others. A hold is not spent money and makes no ledger
    row. It is added to `owner`'s hold row for the account, whose lease runs to
    `expires_at` (for the whole row); `settle` releases it, and the sweep does if the
    lease runs out.
    """
    free = conn.execute(select(Account.balance - Account.held).where(Account.id == account_id)
                        .with_for_update(key_share=True)).scalar()
    if free is None or free < amount or amount <= 0:
        return 0
    granted = amount if up_to is None else min(max(up_to, amount), max(amount, free // share))
    conn.execute(update(Account).where(Account.id == account_id).values(held=Account.held + granted))
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = dialect_insert(LLMHold).values(owner=owner, account_id=account_id, amount=granted,
                                          expires_at=expires_at, created_at=utcnow())
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["owner", "account_id"],
        set_={"amount": LLMHold.amount + stmt.excluded.amount, "expires_at": stmt.excluded.expires_at}))
    return granted


def settle(conn: Connection, account_id: int, held: int, cost: int, *, owner: str, reference: str,
           note: str = "") -> int:
    """Release a hold of `held` taken by `owner` and charge the metered `cost` (a USAGE row); returns what was charged.

    Only what `owner`'s hold row still has is released: if its lease ran out and the
    sweep gave it back, there is nothing left to release. The charge never takes the
    balance below zero: a cost beyond what the account has is cut to what it has (the
    hold bounds it in practice).
    """
    available = _lock_account(conn, account_id)
    if held > 0:
        row = (LLMHold.owner == owner) & (LLMHold.account_id == account_id)
        left = conn.execute(select(LLMHold.amount).where(row)).scalar()
        released = min(held, left or 0)
        if released:
            # The row stays, at zero if need be: its owner renews it while the pool lives,
            # and a missing row then means the lease was lost. Unrenewed, the sweep removes it.
            conn.execute(update(LLMHold).where(row).values(amount=LLMHold.amount - released))
            conn.execute(update(Account).where(Account.id == account_id).values(held=Account.held - released))
    if cost <= 0 or available is None:
        return 0
    cost = max(0, min(cost, available))
    if cost and _insert_once(conn, account_id=account_id, kind=USAGE, amount=-cost, reference=reference, note=note):
        conn.execute(update(Account).where(Account.id == account_id).values(balance=Account.balance - cost))
        return cost
    return 0


def renew_holds(conn: Connection, owner: str, account_ids: Iterable[int], expires_at: datetime) -> set[int]:
    """Extend the lease of `owner`'s hold rows for `account_ids` to `expires_at`; returns the accounts renewed.

    An account missing from the result had its row released by the sweep: the lease was lost.
    """
    account_ids = sorted(set(account_ids))
    if not account_ids:
        return set()
    rows = select(LLMHold.account_id).where(LLMHold.owner == owner, LLMHold.account_id.in_(account_ids))
    if conn.dialect.name == "postgresql":
        # Lock the rows in account order, as a recorder's batch does, before updating them.
        rows = rows.order_by(LLMHold.account_id).with_for_update(key_share=True)
    result = conn.execute(update(LLMHold)
                          .where(LLMHold.owner == owner, LLMHold.account_id.in_(rows))
                          .values(expires_at=expires_at)
                          .returning(LLMHold.account_id))
    return set(result.scalars())


def release_expired_holds(conn: Connection, *, now: datetime | None = None, limit: int = 500) -> int:
    """Give back hold rows whose lease ran out before `now` (their process died), for up to
    `limit` accounts; returns how many rows were released.

    Safe to run in several places at once and while their owners renew: each row is
    deleted under its account's lock by a conditional DELETE that re-checks the lease,
    so it is released once, and never after a renewal that got there first.
    """
    now = now or utcnow()
    expired = LLMHold.expires_at < now
    account_ids = conn.execute(select(LLMHold.account_id).where(expired).distinct()
                               .order_by(LLMHold.account_id).limit(limit)).scalars().all()
    return sum(_release_rows(conn, account_id, expired) for account_id in account_ids)


def release_holds(conn: Connection, owners: Iterable[str]) -> int:
    """Give back all hold rows of `owners` (a process stopping); returns how many rows were released."""
    owners = list(owners)
    mine = LLMHold.owner.in_(owners)
    account_ids = conn.execute(select(LLMHold.account_id).where(mine).distinct()
                               .order_by(LLMHold.account_id)).scalars().all()
    return sum(_release_rows(conn, account_id, mine) for account_id in account_ids)


def _release_rows(conn: Connection, account_id: int, condition: ColumnElement[bool]) -> int:
    _lock_account(conn, account_id)
    amounts = conn.execute(delete(LLMHold).where(LLMHold.account_id == account_id, condition)
                           .returning(LLMHold.amount)).scalars().all()
    if sum(amounts):
        conn.execute(update(Account).where(Account.id == account_id).values(held=Account.held - sum(amounts)))
    return len(amounts)


def _lock_account(conn: Connection, account_id: int) -> int | None:
    """Lock the account's row as an UPDATE would (first, in the lock order above); returns its balance."""
    return conn.execute(select(Account.balance).where(Account.id == account_id)
                        .with_for_update(key_share=True)).scalar()


def balance(conn: Connection, account_id: int) -> int:
    return conn.execute(select(Account.balance).where(Account.id == account_id)).scalar_one()


def ledger_sum(conn: Connection, account_id: int) -> int:
    return conn.execute(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(LedgerEntry.account_id == account_id)
    ).scalar_one()
