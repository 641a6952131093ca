"""The one interface every image backend implements, and the errors it may raise.

Adapters translate their transport's failures into these errors; nothing above
an adapter knows httpx. A `TransientError` is retried with backoff, a
`PermanentError` fails the task (and refunds it) at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import httpx


@dataclass(frozen=True)
class Reference:
    mime_type: str
    data: bytes


@dataclass(frozen=True)
class ImageJob:
    prompt: str
    size: str  # aspect ratio, "16:9" (or "auto")
    resolution: str  # "1k" | "2k" | "4k"
    width: int  # what will be delivered after crop and resize
    height: int
    upstream_model: str
    references: list[Reference] = field(default_factory=list)


class BackendError(Exception):
    transient = False

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TransientError(BackendError):
    """Worth another try: connection errors, timeouts, 429, 5xx."""

    transient = True


class PermanentError(BackendError):
    """Will not get better by retrying: a refused prompt, a bad key, an answer with no image."""


class ImageBackend(Protocol):
    def generate(self, job: ImageJob) -> list[bytes]:
        """Encoded images (PNG, JPEG or WebP bytes) for `job`; raises BackendError."""


def http_error(exc: httpx.HTTPError) -> BackendError:
    """Map an httpx transport failure to a transient backend error."""
    if isinstance(exc, httpx.TimeoutException):
        return TransientError("upstream_timeout", f"The image provider did not answer in time ({type(exc).__name__}).")
    return TransientError("upstream_unavailable", f"Could not reach the image provider ({type(exc).__name__}).")


# Key-like strings a provider may quote back ("Incorrect API key provided: sk-abc...").
_SECRETS = re.compile(r"\b(sk-[A-Za-z0-9_*.-]{3,}|AIza[0-9A-Za-z_-]{10,}|llm_[A-Za-z0-9_-]{8,})")


def redact(text: str, *secrets: str | None) -> str:
    """Provider text as users may see it: no operator key, nor anything shaped like one."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _SECRETS.sub("[redacted]", text)


def status_error(response: httpx.Response, provider: str, api_key: str | None = None) -> BackendError:
    """Map a non-2xx answer: 429 and 5xx are transient, the rest permanent."""
    try:
        detail = response.json()
        detail = (detail.get("error") or {}).get("message") or str(detail)
    except Exception:
        detail = response.text[:300]
    message = redact(f"{provider} answered {response.status_code}: {detail}"[:1000], api_key)
    if response.status_code == 429 or response.status_code >= 500:
        return TransientError("upstream_unavailable" if response.status_code >= 500 else "upstream_rate_limited",
                              message)
    return PermanentError("upstream_rejected", message)
