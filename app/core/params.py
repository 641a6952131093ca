"""The one way to read a value a client sent: a whole number, a time, a row id, a URL, text, a JSON body.

Each reader either returns a value every later step can take (the database, the
JSON encoder, a URL builder) or raises a 400 that names the `param`. Checks such
as `str.isdigit()` are not enough: it is true for "²" and for a thousand digits,
which `int()` refuses or PostgreSQL cannot store. Text that reaches the database
may hold no NUL (PostgreSQL refuses it) and no unpaired surrogate (it cannot be
encoded as UTF-8); a JSON body may nest only so deep.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from urllib.parse import SplitResult, urlsplit

import orjson

from app.core.errors import APIError, invalid

# The largest id of an Integer column (32-bit on PostgreSQL), and of a BigInteger one.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
_WHOLE = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and few enough to be a 64-bit integer
# orjson's own limit; Python's json, which reads what orjson refuses, stops sooner.
MAX_JSON_DEPTH = 1024
# Task, delivery and request ids are letters, digits, '_' and '-' (media_..., msg_..., req_...).
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


def integer(value: str, param: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """A whole number written in ASCII digits, from `minimum` to `maximum`."""
    text = value.strip()
    if _WHOLE.fullmatch(text):
        number = int(text)
        if minimum <= number <= maximum:
            return number
    raise invalid(param, f"'{param}' must be a whole number from {minimum} to {maximum}.")


def is_whole(value: str) -> bool:
    """Whether `value` is a whole number `integer` would read (ASCII digits, 64-bit)."""
    return _WHOLE.fullmatch(value) is not None


def content_length(value: str | None) -> int | None:
    """A Content-Length header's value, or None when absent or not a number (the server framed the
    body; the reader checks its real size anyway)."""
    return int(value) if value is not None and _WHOLE.fullmatch(value) else None


def optional_integer(value: str | None, param: str, default: int, *, minimum: int = 0,
                     maximum: int = INT64_MAX) -> int:
    """`integer`, or `default` when the parameter is absent or empty."""
    return default if value is None or not value.strip() else integer(value, param, minimum=minimum,
                                                                       maximum=maximum)


def row_id(value: str | None) -> int | None:
    """The integer id of a row (an account, a key) if `value` can be one, else None: such an id
    names no row, so a caller answers as for any id it does not find."""
    if value is None or not _WHOLE.fullmatch(value.strip()):
        return None
    number = int(value)
    return number if 1 <= number <= INT32_MAX else None


def position(value: str, below: int = 1000) -> int | None:
    """A place in a short list (0, 1, ...) if `value` names one below `below`, else None."""
    if not _WHOLE.fullmatch(value):
        return None
    number = int(value)
    return number if number < below else None


def is_id(value: str) -> bool:
    """Whether `value` has the shape of a task, delivery or request id: anything else names nothing."""
    return _ID.fullmatch(value) is not None


def is_clean(value: str) -> bool:
    """No NUL and no unpaired surrogate: text the database and UTF-8 can both take."""
    return _BAD_TEXT.search(value) is None


def text(value: str, param: str) -> str:
    """`value` unchanged, or a 400 if it holds a NUL or an unpaired surrogate."""
    if not is_clean(value):
        raise invalid(param, f"'{param}' contains a NUL character or an unpaired surrogate, "
                             "which no text may contain.")
    return value


def moment(value: str, param: str, *, end: bool = False, tz: tzinfo = UTC) -> datetime:
    """A date (`2025-01-31`: its start, or with `end` the start of the next day) or an ISO 8601
    time (with `end`, a microsecond after it, so that the moment itself is included), in UTC;
    a time without a zone is in `tz`. An end past the calendar's last day is its last moment."""
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            found = datetime.combine(day, time(), tzinfo=tz) + (timedelta(days=1) if end else timedelta())
        else:
            found = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if found.tzinfo is None:
                found = found.replace(tzinfo=tz)
            if end:
                found += timedelta(microseconds=1)
        return found.astimezone(UTC)
    except OverflowError:
        if end:
            return datetime.max.replace(tzinfo=UTC)
    except ValueError:
        pass
    raise invalid(param, f"'{param}': expected a date (2025-01-31) or an ISO 8601 time, got {value[:40]!r}.")


def http_url(value: str, param: str, *, max_length: int = 2048) -> SplitResult:
    """An absolute http(s) URL with a host and, if any, a valid port; its parts."""
    if len(value) > max_length:
        raise invalid(param, f"'{param}' is longer than {max_length} characters.")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or not value.isprintable() or " " in value):
        raise invalid(param, f"'{param}' must be an absolute http(s) URL with a valid host and port.")
    return parts


def json_body(body: bytes) -> object:
    """A request body parsed as JSON; 400 when it is not JSON, or nests deeper than MAX_JSON_DEPTH."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise _too_deep() from None
    # What orjson refuses but json accepts (NaN, escaped lone surrogates) is read as before; json
    # recurses once per level and says so before it runs out of stack.
    try:
        return json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise invalid(None, "The request body is not valid JSON.", "invalid_json") from None


def _too_deep() -> APIError:
    return invalid(None, f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels.", "invalid_json")
