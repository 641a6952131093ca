"""Dashboard passwords, hashed with scrypt (memory-hard, in the standard library).

scrypt from hashlib needs no new dependency and is memory-hard: with n=2**15,
r=8 every guess costs 32 MiB of memory and ~0.1 s of CPU, which is what makes
offline guessing of a stolen hash expensive. The parameters are stored in each
hash, so they can be raised later and old hashes still verify.

Format: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

N, R, P = 2**15, 8, 1
DKLEN = 32
MIN_LENGTH = 8
MAX_LENGTH = 1024  # scrypt takes any length; an upper bound keeps a login request cheap to parse


class PasswordError(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _derive(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # maxmem must exceed 128 * r * n bytes (32 MiB here); OpenSSL's default is lower.
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=256 * r * n + 1024 * 1024)


def check_strength(password: str) -> None:
    """Raise PasswordError when `password` is not acceptable as a new password."""
    if len(password) < MIN_LENGTH:
        raise PasswordError(f"a password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise PasswordError(f"a password can have at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    """A new salted hash of `password` (checked with check_strength first)."""
    check_strength(password)
    salt = secrets.token_bytes(16)
    digest = _derive(password, salt, N, R, P, DKLEN)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify(password: str, stored: str | None) -> bool:
    """True when `password` matches `stored`. With no stored hash it still spends the
    time of one hash, so a response's timing does not tell which accounts exist."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        scheme, n, r, p, salt, digest = (stored or "").split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        expected = base64.b64decode(digest)
        actual = _derive(password, base64.b64decode(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        _derive(password, b"\0" * 16, N, R, P, DKLEN)
        return False
    return hmac.compare_digest(actual, expected)


def fingerprint(stored: str | None) -> str:
    """A short digest of a stored hash: a browser's "signed in here before" mark carries it, so a
    password change ends the mark's worth along with the sessions."""
    return hashlib.sha256((stored or "").encode()).hexdigest()[:16]
