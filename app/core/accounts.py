"""Accounts: create, find, show, passwords and dashboard sessions. Balances change only through app.core.ledger.

Dashboard sessions live here, not in app.dashboard, because setting a password must end
them in the same transaction, and the periodic sweep (workers) cleans them up.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, delete, func, insert, select, update

from app.core import ledger, money
from app.core.models import Account, ApiKey, DashboardSession, utcnow


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
    """Store a hash made by app.core.passwords; every dashboard session of the account ends with it."""
    conn.execute(update(Account).where(Account.id == account_id).values(password_hash=password_hash))
    end_sessions(conn, account_id)


def set_admin(conn: Connection, account_id: int, is_admin: bool = True) -> None:
    conn.execute(update(Account).where(Account.id == account_id).values(is_admin=is_admin))


# -- dashboard sessions ---------------------------------------------------------------------------

def session_id(token: str) -> str:
    """The row id of the session whose cookie carries `token`: only its SHA-256 is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def live_session(token: str, now: datetime) -> ColumnElement[bool]:
    """The condition for the session of `token` to be signed in at `now` (for a query's WHERE)."""
    return ((DashboardSession.id == session_id(token)) & DashboardSession.revoked_at.is_(None)
            & (DashboardSession.expires_at > now))


def start_session(conn: Connection, account_id: int, lifetime: timedelta, *, replaces: str | None = None) -> str:
    """A new dashboard session for the account; returns the token for its cookie. The session
    whose token is `replaces` (signed in before, in the same browser) ends."""
    if replaces:
        end_session(conn, replaces)
    token = secrets.token_urlsafe(32)
    now = utcnow()
    conn.execute(insert(DashboardSession).values(id=session_id(token), account_id=account_id, created_at=now,
                                                 expires_at=now + lifetime))
    return token


def _end(conn: Connection, *where: ColumnElement[bool]) -> int:
    now = utcnow()
    # expires_at moves up to now too: the cleanup then finds finished rows by that column alone.
    return conn.execute(update(DashboardSession)
                        .where(*where, DashboardSession.revoked_at.is_(None), DashboardSession.expires_at > now)
                        .values(revoked_at=now, expires_at=now)).rowcount


def end_session(conn: Connection, token: str) -> None:
    """Sign out: the session of `token` ends (a copy of its cookie opens nothing any more)."""
    _end(conn, DashboardSession.id == session_id(token))


def end_sessions(conn: Connection, account_id: int) -> int:
    """Sign the account out everywhere; returns how many sessions ended."""
    return _end(conn, DashboardSession.account_id == account_id)


def count_sessions(conn: Connection, account_id: int) -> int:
    """The account's signed-in dashboard sessions."""
    return conn.execute(select(func.count()).where(
        DashboardSession.account_id == account_id, DashboardSession.revoked_at.is_(None),
        DashboardSession.expires_at > utcnow())).scalar_one()


def delete_finished_sessions(conn: Connection, before: datetime) -> int:
    """Delete sessions that expired or were revoked before `before` (the sweep keeps a day of them)."""
    return conn.execute(delete(DashboardSession).where(DashboardSession.expires_at < before)).rowcount
