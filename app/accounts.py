"""Accounts: create, find, show. Balances change only through app.ledger."""

from __future__ import annotations

from sqlalchemy import Connection, func, insert, select, update

from app import ledger, money
from app.models import Account, ApiKey, utcnow


class AccountError(Exception):
    pass


def create(conn: Connection, email: str, balance: int = 0, *, is_admin: bool = False,
           password_hash: str | None = None) -> int:
    email = email.strip().lower()
    if "@" not in email:
        raise AccountError(f"{email!r} is not an email address")
    if conn.execute(select(Account.id).where(Account.email == email)).first():
        raise AccountError(f"an account for {email} exists already")
    account_id = conn.execute(
        insert(Account).values(email=email, balance=0, held=0, is_admin=is_admin, password_hash=password_hash,
                               created_at=utcnow()).returning(Account.id)
    ).scalar_one()
    if balance:
        ledger.top_up(conn, account_id, balance, note="opening balance")
    return account_id


def find(conn: Connection, email: str) -> int:
    account_id = conn.execute(select(Account.id).where(Account.email == email.strip().lower())).scalar()
    if account_id is None:
        raise AccountError(f"no account for {email}")
    return account_id


def count(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(Account)).scalar_one()


def show(conn: Connection, account_id: int) -> dict:
    account = conn.execute(select(Account).where(Account.id == account_id)).mappings().one()
    keys = conn.execute(
        select(ApiKey.prefix, ApiKey.name, ApiKey.created_at, ApiKey.revoked_at)
        .where(ApiKey.account_id == account_id).order_by(ApiKey.id)
    ).all()
    return {
        "email": account["email"],
        "balance": money.render(account["balance"]),
        "currency": "USD",
        "is_admin": account["is_admin"],
        "created_at": account["created_at"].isoformat(),
        "keys": [{"prefix": k.prefix, "name": k.name, "created_at": k.created_at.isoformat(),
                  "revoked": k.revoked_at is not None} for k in keys],
    }


def set_password_hash(conn: Connection, account_id: int, password_hash: str) -> None:
    """Store a hash made by app.passwords; sessions made with the old password end."""
    conn.execute(update(Account).where(Account.id == account_id).values(password_hash=password_hash))


def set_admin(conn: Connection, account_id: int, is_admin: bool = True) -> None:
    conn.execute(update(Account).where(Account.id == account_id).values(is_admin=is_admin))
