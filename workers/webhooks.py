"""One webhook attempt: claim the due delivery, POST the signed event, record what happened.

The delivery row holds all state (app.webhooks.service); a message only says
"this delivery may be due". Running the same id twice attempts once: the second
claim loses. A 2xx within the timeout is delivered, a 410 stops, anything else
(another status, a timeout, a refused or failed connection) retries on the schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx

from app.webhooks import service, signing
from workers.context import WorkerContext

log = logging.getLogger(__name__)
USER_AGENT = "mediagate-webhooks/1"


def lease_seconds(timeout: float) -> float:
    # Connect, send and read may each take up to the timeout; past this the attempt is
    # presumed dead (the worker was killed) and the sweep hands the delivery out again.
    return 3 * timeout + 10


def _describe(exc: Exception) -> str:
    cause = exc.__cause__ or exc
    text = str(cause) or type(cause).__name__
    return f"{type(exc).__name__}: {text}"


def deliver(ctx: WorkerContext, delivery_id: str,
            publish_later: Callable[[str, float], None] | None = None) -> str:
    """Returns the outcome: delivered, gone, retry, exhausted, lost, or skipped (not due / not ours)."""
    settings = ctx.settings
    with ctx.engine.begin() as conn:
        delivery = service.claim(conn, delivery_id, lease_seconds(settings.webhook_timeout))
    if delivery is None:
        return "skipped"
    body = delivery["payload"]
    headers = {
        **signing.headers(delivery["secrets"], delivery["id"], int(time.time()), body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    status_code, error = None, None
    started = time.monotonic()
    try:
        # Only the status matters; the body is never read. Redirects are not followed.
        with ctx.outbound.stream("POST", delivery["url"], content=body.encode(), headers=headers,
                                 timeout=settings.webhook_timeout) as response:
            status_code = response.status_code
    except httpx.TimeoutException as exc:
        error = f"timeout after {settings.webhook_timeout:g}s ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        error = _describe(exc)[:500]
    elapsed = time.monotonic() - started
    if error is None and elapsed > settings.webhook_timeout:
        error = f"answered after {elapsed:.1f}s, over the {settings.webhook_timeout:g}s limit"
    with ctx.engine.begin() as conn:
        outcome, wake_at = service.finish_attempt(
            conn, delivery, status_code=status_code, error=error, duration_ms=round(elapsed * 1000),
            schedule=settings.webhook_schedule, wake_within=settings.redispatch_after)
    log.info("webhook %s for %s: %s (%s)", delivery_id, delivery["task_id"], outcome, status_code or error)
    if wake_at is not None and publish_later is not None:
        try:
            publish_later(delivery_id, max(0.0, wake_at.timestamp() - time.time()))
        except Exception:  # the sweep sends it once its wake-up is overdue
            log.exception("could not schedule the retry of webhook %s", delivery_id)
    return outcome
