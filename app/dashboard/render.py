"""Jinja2 templates and the filters they use (money, times in the browser's zone)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import Environment, FileSystemLoader, StrictUndefined, pass_context, select_autoescape
from jinja2.runtime import Context
from markupsafe import Markup, escape

from app.core import money

HERE = Path(__file__).resolve().parent
TZ_COOKIE = "tz"
UTC = ZoneInfo("UTC")


def zone(name: str | None) -> ZoneInfo:
    """The browser's IANA zone (the `tz` cookie app.js sets), or UTC."""
    if not name or len(name) > 64 or ".." in name or name.startswith("/"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def usd(amount: int | str | None) -> str:
    """Nano-dollar units, or a USD decimal string as the API renders it, as "$0.01200"."""
    if isinstance(amount, str):
        amount = money.from_usd(amount)
    return "$" + money.render(amount or 0)


@pass_context
def when(context: Context, value: datetime | str | None, style: str = "datetime") -> Markup:
    """A <time> in the page's zone; app.js re-renders it with the browser's own clock settings."""
    if value is None:
        return Markup('<span class="muted">never</span>')
    if isinstance(value, str):  # service functions that render for the API give ISO strings
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    local = value.astimezone(context.get("tz") or UTC)
    text = local.strftime("%Y-%m-%d" if style == "date" else "%Y-%m-%d %H:%M:%S" if style == "seconds"
                          else "%Y-%m-%d %H:%M")
    return Markup(f'<time datetime="{escape(value.isoformat())}" data-style="{escape(style)}">{escape(text)}</time>')


def tokens(value: int | None) -> str:
    return f"{value or 0:,}"


ENV = Environment(
    loader=FileSystemLoader(str(HERE / "templates")),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(usd=usd, when=when, tokens=tokens)


def page(name: str, **context: Any) -> str:
    return ENV.get_template(name).render(**context)
