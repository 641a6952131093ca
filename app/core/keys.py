"""API keys: `llm_` + 43 URL-safe random characters. Only a SHA-256 hash and a display prefix are stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from app.core.models import ApiKey, utcnow

PREFIX = "llm_"
DISPLAY_CHARS = 12  # "llm_" and 8 more: enough to tell keys apart, useless to an attacker


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(value: str) -> bool:
    return value.startswith(PREFIX) and 36 <= len(value) <= 200


@dataclass(frozen=True)
class NewKey:
    id: int
    key: str  # shown once
    prefix: str


def create(conn: Connection, account_id: int, name: str = "") -> NewKey:
    key = PREFIX + secrets.token_urlsafe(32)
    prefix = key[:DISPLAY_CHARS]
    key_id = conn.execute(
        insert(ApiKey).values(account_id=account_id, name=name, prefix=prefix, key_hash=hash_key(key),
                              created_at=utcnow()).returning(ApiKey.id)
    ).scalar_one()
    return NewKey(key_id, key, prefix)


class AmbiguousPrefix(Exception):
    """A display prefix that more than one live key shares: the whole key is needed."""


def revoke(conn: Connection, prefix: str, account_id: int | None = None) -> int:
    """Revoke the live key given whole, or by its display prefix (of `account_id`, if given);
    returns how many (0 or 1). Raises AmbiguousPrefix rather than revoke several keys."""
    conditions = [ApiKey.revoked_at.is_(None),
                  ApiKey.key_hash == hash_key(prefix) if len(prefix) > DISPLAY_CHARS else ApiKey.prefix == prefix]
    if account_id is not None:
        conditions.append(ApiKey.account_id == account_id)
    ids = conn.execute(select(ApiKey.id).where(*conditions)).scalars().all()
    if len(ids) > 1:
        raise AmbiguousPrefix(f"{len(ids)} live keys start with {prefix!r}; give the whole key")
    if not ids:
        return 0
    return conn.execute(update(ApiKey).where(ApiKey.id == ids[0], ApiKey.revoked_at.is_(None))
                        .values(revoked_at=utcnow())).rowcount


def revoke_by_id(conn: Connection, key_id: int, account_id: int) -> bool:
    return conn.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.account_id == account_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    ).rowcount == 1


def lookup(conn: Connection, key: str) -> tuple[int, int] | None:
    """(key id, account id) of a live key, or None."""
    row = conn.execute(
        select(ApiKey.id, ApiKey.account_id).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).first()
    return (row[0], row[1]) if row else None
