"""Dashboard sessions: a signed cookie, its CSRF token, and the login rate limit.

The cookie is ``base64url(json).base64url(HMAC-SHA256)``, made with the standard
library rather than Starlette's SessionMiddleware (which needs itsdangerous and
would decode a cookie on every API request, the hot path included): the whole
job is one HMAC and a constant-time compare. It carries the CSRF token, the time
it was made and, once signed in, the session's token: the session itself is a
`dashboard_sessions` row (app.core.accounts), so signing out, a password change or
"sign out everywhere" ends it on the server, and a copy of the cookie taken
before opens nothing. Every visitor gets a cookie, signed in or not, so the
sign-in form has a CSRF token too; a visitor who is not signed in has no row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from app.core import passwords
from app.core.settings import Settings

COOKIE = "mediagate_session"
COOKIE_PATH = "/dashboard"
MAX_AGE = 14 * 24 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_key(settings: Settings) -> bytes:
    """MEDIAGATE_SECRET_KEY, or a random key made once and kept in data_dir/secret_key (mode 0600)."""
    if settings.secret_key:
        return settings.secret_key.encode()
    path = Path(settings.data_dir) / "secret_key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48).encode()
    try:  # O_EXCL: when two processes start at once, one key wins and both use it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    token: str | None = None  # the signed-in session's token (its row is keyed by the hash)
    # The account this browser last signed in to, kept after signing out: the login limiter
    # lets it past the per-account limit, which strangers' failures may have used up. With a
    # fingerprint of the password it signed in with (passwords.fingerprint): a changed password
    # makes the mark worth nothing, so a copy of an old cookie gets no guesses past the limit.
    last_account: int | None = None
    last_password: str | None = None
    issued_at: int = field(default_factory=lambda: int(time.time()))
    changed: bool = False  # needs a Set-Cookie on the response


class Signer:
    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"mediagate.dashboard.session:" + key).digest()

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def dumps(self, session: Session) -> str:
        body = {"c": session.csrf, "s": session.token, "k": session.last_account, "f": session.last_password,
                "t": session.issued_at}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def loads(self, cookie: str | None) -> Session | None:
        """The session in a cookie, or None when it is missing, forged or expired."""
        if not cookie or "." not in cookie or len(cookie) > 4096:
            return None
        payload, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            body = json.loads(_unb64(payload))
            token, last, fingerprint = body.get("s"), body.get("k"), body.get("f")
            session = Session(csrf=str(body["c"]), token=str(token) if token else None,
                              last_account=int(last) if last is not None else None,
                              last_password=str(fingerprint) if fingerprint else None, issued_at=int(body["t"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if session.issued_at + MAX_AGE < time.time():
            return None
        return session


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf, str(token))


def knows(session: Session, account_id: int, password_hash: str | None) -> bool:
    """Whether the browser of `session` signed in to this account with its current password."""
    return (session.last_account == account_id and session.last_password is not None
            and hmac.compare_digest(session.last_password, passwords.fingerprint(password_hash)))


class LoginLimiter:
    """Failed sign-ins in a sliding window, in this process, counted three ways:

    - per client address and email: 5 (the owner's own typos, or one address guessing one account);
    - per client address: 20, whatever the emails (one address guessing many accounts);
    - per email: 50 from all addresses together (a guess spread over many addresses).

    Failures from one address never stop another address on their own; only the
    per-email count, ten times the first one, is shared, and a browser that has
    signed in to that account before (its signed cookie says so) is not held by it, so
    strangers cannot lock the owner out. A success clears only its address's count for
    that email: an attacker signing in to an account of their own resets nothing else.

    Per process, not in the database: it needs no table and no write per attempt,
    and what it must do is turn online guessing from thousands of tries a second
    into a handful a minute. With W web processes an attacker gets at most W times
    the budget, still far too few guesses to matter; and each guess costs the
    server a scrypt anyway.
    """

    def __init__(self, per_pair: int = 5, per_address: int = 20, per_email: int = 50, window: float = 900.0) -> None:
        self.limits = {"pair": per_pair, "address": per_address, "email": per_email}
        self.window = window
        self._failures: dict[tuple[str, ...], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, ...], now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    @staticmethod
    def _keys(email: str, address: str) -> list[tuple[str, ...]]:
        return [("pair", address, email), ("address", address), ("email", email)]

    def retry_after(self, email: str, address: str, *, known_browser: bool = False) -> int:
        """Seconds until another attempt is allowed; 0 when it is allowed now. `known_browser`:
        the request comes from a browser that signed in to this email's account before."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key in self._keys(email, address):
                if key[0] == "email" and known_browser:
                    continue
                times = self._recent(key, now)
                if len(times) >= self.limits[key[0]]:
                    wait = max(wait, times[0] + self.window - now)
        return int(wait) + 1 if wait else 0

    def failed(self, email: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 100_000:  # bounded memory under a spray of addresses
                self._failures.clear()
            for key in self._keys(email, address):
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, email: str, address: str) -> None:
        with self._lock:
            self._failures.pop(("pair", address, email), None)
