"""The only code that changes a balance.

Every change is a ledger row written in the same transaction as the balance
update (and, by the caller, as the state change that causes it). Functions take
a sync `Connection` already inside a transaction; the caller commits.

Invariant: accounts.balance == SUM(ledger_entries.amount) for every account.
"""

from __future__ import annotations

import functools

from sqlalchemy import Connection, Table, bindparam, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.models import Account, LedgerEntry, Timestamp, utcnow

TOPUP, CHARGE, REFUND, USAGE = "topup", "charge", "refund", "usage"


class InsufficientBalance(Exception):
    pass


def _insert_once(conn: Connection, **values) -> bool:
    """Insert a ledger row unless one with the same (kind, reference) exists."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(LedgerEntry).values(created_at=utcnow(), **values)
    stmt = stmt.on_conflict_do_nothing(index_elements=["kind", "reference"]).returning(LedgerEntry.id)
    # RETURNING, not rowcount: psycopg 3 with SQLAlchemy 2.1 reports rowcount -1 for this statement.
    return conn.execute(stmt).first() is not None


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
    # Parameter names must not match column names: SQLAlchemy would add those to the UPDATE's SET.
    params = {"account_id_": account_id, "amount_": amount, "debit_": -amount, "reference_": reference,
              "note_": note, "now_": utcnow(), **{f"row_{k}": v for k, v in values.items()}}
    if conn.execute(_charge_with_row_statement(table, tuple(values)), params).first() is None:
        raise InsufficientBalance()


@functools.lru_cache(maxsize=8)
def _charge_with_row_statement(table: Table, columns: tuple[str, ...]):
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


def hold(conn: Connection, account_id: int, amount: int) -> bool:
    """Reserve `amount` of the free balance for a request in flight; False if it can't be covered.

    A hold is not spent money and makes no ledger row; `settle` releases it.
    """
    result = conn.execute(
        update(Account)
        .where(Account.id == account_id, Account.balance - Account.held >= amount)
        .values(held=Account.held + amount)
    )
    return result.rowcount == 1


def settle(conn: Connection, account_id: int, held: int, cost: int, *, reference: str, note: str = "") -> int:
    """Release a hold of `held` and charge the metered `cost` (a USAGE row); returns what was charged.

    The charge never takes the balance below zero: a cost beyond what the
    account has is cut to what it has (the hold bounds it in practice).
    """
    conn.execute(update(Account).where(Account.id == account_id).values(held=Account.held - held))
    if cost <= 0:
        return 0
    available = conn.execute(select(Account.balance).where(Account.id == account_id)).scalar_one()
    cost = max(0, min(cost, available))
    if cost and _insert_once(conn, account_id=account_id, kind=USAGE, amount=-cost, reference=reference, note=note):
        conn.execute(update(Account).where(Account.id == account_id).values(balance=Account.balance - cost))
        return cost
    return 0


def balance(conn: Connection, account_id: int) -> int:
    return conn.execute(select(Account.balance).where(Account.id == account_id)).scalar_one()


def ledger_sum(conn: Connection, account_id: int) -> int:
    return conn.execute(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(LedgerEntry.account_id == account_id)
    ).scalar_one()
