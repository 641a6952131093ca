"""What the dashboard reads and writes. Sync functions on a `Connection`; the caller owns the transaction.

Balances change only through app.core.ledger, keys through app.core.keys, and usage records are
read through app.proxy.history (the same pages and CSV as GET /v1/usage). This module
reads the tables directly where no service function exists (spend by day, the task
gallery with its webhook deliveries, the accounts list).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Connection, SQLColumnExpression, case, func, select

from app.core import accounts, ledger, pagination
from app.core import params as app_params
from app.core.errors import APIError
from app.core.models import Account, ApiKey, DashboardSession, ImageTask, UsageRecord, WebhookAttempt, WebhookDelivery
from app.proxy import history

CHART_DAYS = 30


# -- accounts and sign-in -------------------------------------------------------------------------

def login_account(conn: Connection, email: str) -> tuple[int, str | None] | None:
    row = conn.execute(select(Account.id, Account.password_hash)
                       .where(Account.email == email.strip().lower())).first()
    return (row[0], row[1]) if row else None


def session_account(conn: Connection, token: str, now: datetime) -> dict | None:
    """The account signed in with the session of `token`, or None when that session has ended.
    One read by primary key: every signed-in page makes it."""
    row = conn.execute(
        select(Account.id, Account.email, Account.balance, Account.held, Account.is_admin)
        .join(DashboardSession, DashboardSession.account_id == Account.id)
        .where(accounts.live_session(token, now))
    ).mappings().first()
    return dict(row) if row else None


# -- spend ----------------------------------------------------------------------------------------

def day_starts(tz: ZoneInfo, now: datetime, days: int = CHART_DAYS) -> list[datetime]:
    """UTC instants of local midnight for the last `days` days (oldest first) and of tomorrow."""
    today = now.astimezone(tz).date()
    first = today - timedelta(days=days - 1)
    return [datetime.combine(first + timedelta(days=i), time(), tz).astimezone(UTC)
            for i in range(days + 1)]


def _by_day(conn: Connection, column: SQLColumnExpression[datetime], model_col: SQLColumnExpression[str],
            amount: SQLColumnExpression[int], where: list[ColumnElement[bool]],
            starts: list[datetime]) -> list[tuple[str, int, int]]:
    # The day index is computed by the database with one CASE over the local-midnight
    # boundaries: portable (SQLite and PostgreSQL), right across DST, and only the
    # aggregate (days x models rows) leaves the database.
    # (Grouped in an outer query: PostgreSQL would not match a CASE repeated in GROUP BY
    # with its own, differently numbered, parameters.)
    bucket = case(*[(column < start, index) for index, start in enumerate(starts[1:])], else_=-1)
    inner = (select(model_col.label("model"), bucket.label("day"), amount.label("amount"))
             .where(*where, column >= starts[0], column < starts[-1]).subquery())
    stmt = select(inner.c.model, inner.c.day, func.sum(inner.c.amount)).group_by(inner.c.model, inner.c.day)
    return [(model, int(day), int(total or 0)) for model, day, total in conn.execute(stmt)]


def spend(conn: Connection, account_id: int, tz: ZoneInfo, now: datetime) -> dict:
    """Spend of the last 30 local days by day and model: LLM usage costs plus image task
    charges that were not refunded (by the day the task was made)."""
    starts = day_starts(tz, now)
    rows = _by_day(conn, UsageRecord.created_at, UsageRecord.model, UsageRecord.cost,
                   [UsageRecord.account_id == account_id], starts)
    rows += _by_day(conn, ImageTask.created_at, ImageTask.model, ImageTask.charge,
                    [ImageTask.account_id == account_id, ImageTask.refunded.is_(False)], starts)
    days = [starts[i].astimezone(tz).date() for i in range(CHART_DAYS)]
    series: dict[str, list[int]] = {}
    for model, day, total in rows:
        if 0 <= day < CHART_DAYS:
            series.setdefault(model, [0] * CHART_DAYS)[day] += total
    daily = [sum(values[i] for values in series.values()) for i in range(CHART_DAYS)]
    return {"days": days, "series": series, "today": daily[-1], "week": sum(daily[-7:]), "month": sum(daily)}


# -- API keys -------------------------------------------------------------------------------------

def list_keys(conn: Connection, account_id: int) -> list[dict]:
    rows = conn.execute(
        select(ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.created_at, ApiKey.last_used_at, ApiKey.revoked_at)
        .where(ApiKey.account_id == account_id)
        .order_by(ApiKey.revoked_at.is_not(None), ApiKey.id.desc())
    ).mappings()
    return [dict(row) for row in rows]


# -- usage (read through app.proxy.history) -------------------------------------------------------

def usage_filters(params: Mapping[str, str], tz: ZoneInfo) -> tuple[history.Filters, dict]:
    """The usage filter from query parameters `from`, `to` (days in the browser's zone, both
    included), `model` and `key` (an id), for app.proxy.history (which also serves GET /v1/usage).
    Returns the filter and the cleaned values to show in the form."""
    form = {"from": "", "to": "", "model": "", "key": ""}
    since = until = None
    # A hand-edited URL with a bad value: that filter is left out rather than an error shown.
    with contextlib.suppress(APIError):
        if len(params.get("from") or "") == 10:
            since = app_params.moment(params["from"], "from", tz=tz)
            form["from"] = params["from"]
    with contextlib.suppress(APIError):
        if len(params.get("to") or "") == 10:
            until = app_params.moment(params["to"], "to", end=True, tz=tz)
            form["to"] = params["to"]
    key_id = app_params.row_id(params.get("key"))
    form["key"] = str(key_id) if key_id is not None else ""
    model = (params.get("model") or "").strip()[:100] or None
    if model is not None and not app_params.is_clean(model):
        model = None
    form["model"] = model or ""
    return history.Filters(since=since, until=until, model=model, key_id=key_id), form


def decode_cursor(text: str | None) -> tuple[datetime, str] | None:
    """A page link's cursor; a mangled one just starts from the newest row."""
    if not text:
        return None
    try:
        return pagination.decode_cursor(text)
    except APIError:
        return None


# -- image tasks ----------------------------------------------------------------------------------

def _deliveries(conn: Connection, task_ids: list[str]) -> dict[str, list[dict]]:
    if not task_ids:
        return {}
    last_code = (select(WebhookAttempt.status_code).where(WebhookAttempt.delivery_id == WebhookDelivery.id)
                 .order_by(WebhookAttempt.id.desc()).limit(1).scalar_subquery())
    last_error = (select(WebhookAttempt.error).where(WebhookAttempt.delivery_id == WebhookDelivery.id)
                  .order_by(WebhookAttempt.id.desc()).limit(1).scalar_subquery())
    rows = conn.execute(
        select(WebhookDelivery.id, WebhookDelivery.task_id, WebhookDelivery.event_type, WebhookDelivery.status,
               WebhookDelivery.attempt_count, WebhookDelivery.next_attempt_at, WebhookDelivery.delivered_at,
               WebhookDelivery.created_at, WebhookDelivery.url, last_code.label("last_status_code"),
               last_error.label("last_error"))
        .where(WebhookDelivery.task_id.in_(task_ids)).order_by(WebhookDelivery.created_at)
    ).mappings()
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["task_id"], []).append(dict(row))
    return out


def tasks_page(conn: Connection, account_id: int, status: str | None = None,
               cursor: tuple[datetime, str] | None = None, limit: int = 24) -> tuple[list[dict], str | None]:
    """One page of the account's image tasks, newest first, each with its webhook deliveries."""
    stmt = (select(ImageTask).where(ImageTask.account_id == account_id)
            .order_by(ImageTask.created_at.desc(), ImageTask.id.desc()).limit(limit + 1))
    if status:
        stmt = stmt.where(ImageTask.status == status)
    if cursor:
        stmt = stmt.where(pagination.older_than(cursor, ImageTask.created_at, ImageTask.id))
    rows = [dict(row) for row in conn.execute(stmt).mappings()]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = pagination.encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
    deliveries = _deliveries(conn, [row["id"] for row in rows])
    for row in rows:
        row["deliveries"] = deliveries.get(row["id"], [])
    return rows, next_cursor


def task_detail(conn: Connection, account_id: int, task_id: str) -> dict | None:
    """The task with its deliveries and every attempt, or None when it is not this account's."""
    row = conn.execute(select(ImageTask).where(ImageTask.id == task_id, ImageTask.account_id == account_id)
                       ).mappings().first()
    if row is None:
        return None
    task = dict(row)
    task["deliveries"] = _deliveries(conn, [task_id]).get(task_id, [])
    ids = [d["id"] for d in task["deliveries"]]
    attempts: dict[str, list[dict]] = {}
    if ids:
        for att in conn.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids))
                                .order_by(WebhookAttempt.id)).mappings():
            attempts.setdefault(att["delivery_id"], []).append(dict(att))
    for delivery in task["deliveries"]:
        delivery["attempts"] = attempts.get(delivery["id"], [])
    return task


def task_image_url(conn: Connection, account_id: int, task_id: str, index: int) -> str | None:
    urls = conn.execute(select(ImageTask.result_urls).where(
        ImageTask.id == task_id, ImageTask.account_id == account_id, ImageTask.status == "completed")).scalar()
    return urls[index] if urls and 0 <= index < len(urls) else None


def recent_deliveries(conn: Connection, account_id: int, limit: int = 20) -> list[dict]:
    ids = list(conn.execute(select(WebhookDelivery.task_id).where(WebhookDelivery.account_id == account_id)
                            .order_by(WebhookDelivery.created_at.desc()).limit(limit)).scalars())
    rows = [d for task in _deliveries(conn, list(dict.fromkeys(ids))).values() for d in task]
    return sorted(rows, key=lambda d: d["created_at"], reverse=True)[:limit]


# -- admin ----------------------------------------------------------------------------------------

def top_up(conn: Connection, account_id: int, amount: int, note: str) -> bool:
    """An admin's top-up through the ledger (a `topup` row with the note); False if no such account."""
    if conn.execute(select(Account.id).where(Account.id == account_id)).first() is None:
        return False
    ledger.top_up(conn, account_id, amount, note)
    return True


def list_accounts(conn: Connection, search: str = "", limit: int = 200) -> list[dict]:
    keys = (select(func.count()).where(ApiKey.account_id == Account.id, ApiKey.revoked_at.is_(None))
            .scalar_subquery())
    stmt = (select(Account.id, Account.email, Account.balance, Account.held, Account.is_admin,
                   Account.password_hash.is_not(None).label("has_password"), Account.created_at,
                   keys.label("live_keys"))
            .order_by(Account.email).limit(limit))
    if search:
        stmt = stmt.where(Account.email.contains(search.strip().lower(), autoescape=True))
    return [dict(row) for row in conn.execute(stmt).mappings()]


def overview(conn: Connection, account_id: int, tz: ZoneInfo, now: datetime) -> dict:
    """The overview page: spend by day and model, the latest requests and tasks."""
    return {
        "spend": spend(conn, account_id, tz, now),
        "recent_usage": history.page(conn, account_id, history.Filters(), limit=8)[0],
        "recent_tasks": tasks_page(conn, account_id, limit=6)[0],
    }
