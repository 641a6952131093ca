"""SQLAlchemy models. Money columns are integers in nano-dollars (see app.core.money).

The schema is made only by Alembic (alembic/versions); tests check that these
models and the migrations agree.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """A time as the API writes it: ISO 8601 in UTC with a Z (`2025-05-04T03:02:01.123456Z`)."""
    return value.isoformat().replace("+00:00", "Z") if value else None


# Row ids need to be unique, not secret: a seeded PRNG spares a system call per row.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)  # a forked process must not repeat its parent's ids


def time_ordered_id(prefix: str) -> str:
    """`prefix`, 12 hex digits of milliseconds since the epoch, then 16 random ones.

    Ids made later sort later, so a row keyed by one goes in at the end of its table's
    primary-key index rather than at a random place in it: on SQLite with a million
    usage records, about 4 us of CPU per record instead of 20-30 us with random ids.
    """
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{_ids.getrandbits(64):016x}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Every model here is declared with __tablename__, so it is mapped to a Table (which the ledger's
    # insert-with-row and insert_unless_exists take), not to some other FromClause.
    __table__: ClassVar[Table]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every database; SQLite stores naive UTC text."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: datetime | None) -> str | None:
            # The text SQLAlchemy's SQLite DATETIME stores, made in one step rather than two
            # (the usage writer binds one per record).
            if value is None:
                return None
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            return value.isoformat(" ", "microseconds")

        return process

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


Money = BigInteger  # nano-dollars
Timestamp = UTCDateTime()


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    # Always equals the sum of this account's ledger entries; changed only by app.core.ledger.
    balance: Mapped[int] = mapped_column(Money, default=0)
    # Reserved by LLM requests in flight (not spent): balance - held is what a new request may use.
    held: Mapped[int] = mapped_column(Money, default=0)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # After a rotation, deliveries are signed with both secrets until this time.
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    # The first characters of the key, shown to people to tell keys apart.
    prefix: Mapped[str] = mapped_column(String(20), index=True)
    # SHA-256 of the whole key; the key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class LedgerEntry(Base):
    """One balance change. `amount` is signed: top-ups and refunds add, charges subtract.

    (kind, reference) is unique where reference is set, so a task is charged once
    and refunded at most once by construction, not only by care.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (UniqueConstraint("kind", "reference", name="uq_ledger_entries_kind_reference"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # topup | charge | refund | usage
    amount: Mapped[int] = mapped_column(Money)
    reference: Mapped[str | None] = mapped_column(String(100), nullable=True)
    note: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class ImageTask(Base):
    __tablename__ = "image_tasks"
    __table_args__ = (
        Index("ix_image_tasks_account_created", "account_id", "created_at"),
        Index("ix_image_tasks_status_dispatched", "status", "dispatched_at"),
        UniqueConstraint("account_id", "idempotency_key", name="uq_image_tasks_account_idempotency"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # media_<random>
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), nullable=True)
    model: Mapped[str] = mapped_column(String(100))
    prompt: Mapped[str] = mapped_column(Text)
    size: Mapped[str] = mapped_column(String(10))
    resolution: Mapped[str] = mapped_column(String(4))
    n: Mapped[int] = mapped_column(Integer, default=1)
    image_urls: Mapped[list] = mapped_column(JSON, default=list)
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    # What was debited at submission, in nano-dollars.
    charge: Mapped[int] = mapped_column(Money)
    # pending -> processing -> completed | failed | canceled; changed only by compare-and-set.
    status: Mapped[str] = mapped_column(String(12), default="pending")
    result_urls: Mapped[list | None] = mapped_column(JSON, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(50), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    refunded: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    # When a wake-up for this task was last handed to the broker (None: not yet).
    dispatched_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # A processing task whose lease ran out lost its worker; the sweep takes it up again.
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class WebhookDelivery(Base):
    """One event for one task, delivered until a 2xx, a 410 or the schedule runs out."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msg_<random>: the webhook-id header
    task_id: Mapped[str] = mapped_column(ForeignKey("image_tasks.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    event_type: Mapped[str] = mapped_column(String(30))
    payload: Mapped[str] = mapped_column(Text)  # the exact JSON body, signed as sent
    status: Mapped[str] = mapped_column(String(12), default="pending")  # pending | delivered | failed
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # When POST .../webhooks/redeliver last reset this delivery: redeliveries are spaced by it.
    redelivered_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)


class UsageRecord(Base):
    """One LLM request through the passthrough, metered from what the upstream reported."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_account_created", "account_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # time_ordered_id("req_")
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), nullable=True)
    model: Mapped[str] = mapped_column(String(100))
    api_format: Mapped[str] = mapped_column(String(12))  # chat | responses | messages | gemini
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # False when the upstream reported no usage at all.
    usage_reported: Mapped[bool] = mapped_column(Boolean, default=False)
    # True when the upstream's final usage never came (the client left before it, or the upstream
    # ended without it) and the call was charged from an estimate of what was streamed.
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The channel (provider) that answered, or was tried last, and how many were tried. For
    # operators (failover): never shown to the account, never the provider's key.
    channel: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    cost: Mapped[int] = mapped_column(Money, default=0)
    upstream_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    ttfb_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    client_disconnected: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class LLMHold(Base):
    """Balance one web process holds for an account's LLM calls in flight, under a lease.

    `accounts.held` is always the sum of these rows' amounts (app.core.ledger changes both in
    one transaction). The process renews `expires_at` while it runs; a row left to expire
    belonged to a process that died, and the periodic sweep gives its amount back.
    """

    __tablename__ = "llm_holds"
    __table_args__ = (Index("ix_llm_holds_expires_at", "expires_at"),)

    # The holding process: host, pid and a random part, new at each start (and after a lost lease).
    owner: Mapped[str] = mapped_column(String(100), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    amount: Mapped[int] = mapped_column(Money, default=0)
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class UsageBatch(Base):
    """A batch of finished LLM calls the usage writer has settled and recorded.

    Its id is written in the batch's own transaction, so a batch sent again (its writer
    process died before answering, or its commit went through but was reported failed) is
    recognized and not applied twice. Kept an hour (the recorder resends for half that).
    """

    __tablename__ = "usage_batches"
    __table_args__ = (Index("ix_usage_batches_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class DashboardSession(Base):
    """A signed-in dashboard session. The cookie carries a random token; this row is keyed by
    its SHA-256, so the table alone (a backup, a leaked dump) opens no session.

    A session works while `expires_at` is in the future and `revoked_at` is unset. Revoking
    (sign-out, a password change, "sign out everywhere") sets both to the time it happened,
    so the cleanup in the periodic sweep finds every finished row through one index.
    """

    __tablename__ = "dashboard_sessions"
    __table_args__ = (Index("ix_dashboard_sessions_expires_at", "expires_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie's token
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
