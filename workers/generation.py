"""One image task, start to end: claim, call the backend (retrying transient errors), store, complete.

Any failure ends the task `failed` and refunds it, in one transaction, exactly
once. Running the same task id twice generates once: the second claim loses.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from app.images import lifecycle
from app.images.dimensions import dimensions
from workers import events, imaging, references
from workers.backends.base import BackendError, ImageJob, PermanentError
from workers.context import WorkerContext

log = logging.getLogger(__name__)
T = TypeVar("T")


def run(ctx: WorkerContext, task_id: str) -> str:
    """Returns what happened: "completed", "failed", "skipped" (not ours to run) or "lost" (ended meanwhile)."""
    settings = ctx.settings
    with ctx.engine.begin() as conn:
        task = lifecycle.claim(conn, task_id, settings.task_lease_seconds)
    if task is None:
        return "skipped"
    attempt = task["attempts"]
    try:
        urls = _generate(ctx, task)
    except BackendError as exc:
        return _fail(ctx, task_id, attempt, exc.code, exc.message)
    except Exception as exc:  # a bug must not keep the charge: fail and refund, and say so in the log
        log.exception("task %s crashed", task_id)
        return _fail(ctx, task_id, attempt, "internal_error",
                     f"The worker failed unexpectedly ({type(exc).__name__}).")
    with ctx.engine.begin() as conn:
        done = lifecycle.complete(conn, task_id, urls, attempt)
    if done:
        events.task_ended(ctx, task_id)
    return "completed" if done else "lost"


def _fail(ctx: WorkerContext, task_id: str, attempt: int, code: str, message: str) -> str:
    with ctx.engine.begin() as conn:
        failed = lifecycle.fail(conn, task_id, code, message, attempt)
    if failed:
        events.task_ended(ctx, task_id)
    return "failed" if failed else "lost"


def _generate(ctx: WorkerContext, task: dict) -> list[str]:
    model = ctx.catalog.get(task["model"], "image")
    if model is None:
        raise PermanentError("model_unavailable", f"The model {task['model']!r} is no longer offered.")
    width, height = dimensions(task["size"], task["resolution"])
    refs = _with_retries(ctx, task, lambda: references.resolve(task["image_urls"] or [], ctx.outbound,
                                                               ctx.settings.max_reference_bytes))
    job = ImageJob(task["prompt"], task["size"], task["resolution"], width, height, model.upstream_model, refs)
    backend = ctx.backend(model.provider)
    images = _with_retries(ctx, task, lambda: backend.generate(job))
    if not images:
        raise PermanentError("no_image", "The provider answered without an image.")
    urls = []
    for index, data in enumerate(images[: task["n"]]):
        png = imaging.finish(data, task["size"], task["resolution"], width, height)
        urls.append(ctx.storage.save(f"{task['id']}/{index}.png", png))
    return urls


def _with_retries(ctx: WorkerContext, task: dict, call: Callable[[], T]) -> T:
    """`call()`, retrying transient errors with jittered exponential backoff. The claim's lease
    is renewed before every try, so it outlives any one call (keep the lease above the timeout)."""
    settings = ctx.settings
    attempt = 0
    while True:
        with ctx.engine.begin() as conn:
            if not lifecycle.extend_lease(conn, task["id"], settings.task_lease_seconds, task["attempts"]):
                raise PermanentError("canceled", "The task ended or was taken up again while it ran.")
        try:
            return call()
        except BackendError as exc:
            if not exc.transient or attempt >= settings.backend_retries:
                raise
            delay = settings.backend_retry_backoff * (2 ** attempt) * (0.5 + random.random())
            log.info("task %s: %s, retry %d in %.1fs", task["id"], exc.code, attempt + 1, delay)
            attempt += 1
            time.sleep(delay)
