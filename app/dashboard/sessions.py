"""Dashboard sessions: a signed cookie, its CSRF token, and the login rate limit.

The cookie is ``base64url(json).base64url(HMAC-SHA256)``, made with the standard
library rather than Starlette's SessionMiddleware (which needs itsdangerous and
would decode a cookie on every API request, the hot path included): the whole
job is one HMAC and a constant-time compare. It carries the account id, the
sign-in time, a fingerprint of the password hash (a password change ends old
sessions) and the CSRF token. Every visitor gets one, signed in or not, so the
sign-in form has a CSRF token too.
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

COOKIE = "mediagate_session"
COOKIE_PATH = "/dashboard"
MAX_AGE = 14 * 24 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_key(settings) -> bytes:
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
    account_id: int | None = None
    password: str | None = None  # passwords.fingerprint of the hash signed in with
    issued_at: int = field(default_factory=lambda: int(time.time()))
    changed: bool = False  # needs a Set-Cookie on the response


class Signer:
    def __init__(self, key: bytes):
        self._key = hashlib.sha256(b"mediagate.dashboard.session:" + key).digest()

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def dumps(self, session: Session) -> str:
        body = {"c": session.csrf, "a": session.account_id, "p": session.password, "t": session.issued_at}
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
            session = Session(csrf=str(body["c"]), account_id=body["a"], password=body["p"], issued_at=int(body["t"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.issued_at + MAX_AGE < time.time():
            return None
        return session


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf, str(token))


class LoginLimiter:
    """Failed sign-ins per email and per client address, in a sliding window, in this process.

    Per process, not in the database: it needs no table and no write per attempt,
    and what it must do is turn online guessing from thousands of tries a second
    into a handful a minute. With W web processes an attacker gets at most W times
    the budget, still far too few guesses to matter; and each guess costs the
    server a scrypt anyway. A successful sign-in clears the email's count.
    """

    def __init__(self, per_email: int = 5, per_address: int = 20, window: float = 900.0):
        self.limits = {"email": per_email, "address": per_address}
        self.window = window
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def retry_after(self, email: str, address: str) -> int:
        """Seconds until another attempt is allowed; 0 when it is allowed now."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for kind, value in (("email", email), ("address", address)):
                times = self._recent((kind, value), now)
                if len(times) >= self.limits[kind]:
                    wait = max(wait, times[0] + self.window - now)
        return int(wait) + 1 if wait else 0

    def failed(self, email: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 100_000:  # bounded memory under a spray of addresses
                self._failures.clear()
            for key in (("email", email), ("address", address)):
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, email: str) -> None:
        with self._lock:
            self._failures.pop(("email", email), None)
