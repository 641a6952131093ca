"""What happens when a task ends, besides its state: its webhook event goes out.

The event row itself was written with the terminal transition (app.images.lifecycle);
here, after that commit, a worker is woken to deliver it. If this wake-up is lost,
the sweep sends another: the row is the source of truth.
"""

from __future__ import annotations

from app.webhooks.wake import deliver_soon
from workers.context import WorkerContext


def task_ended(ctx: WorkerContext, task_id: str) -> None:
    """Called once, by the winner of a task's terminal transition, after it committed."""
    from workers.celery_app import DELIVER, celery, publisher  # the app that runs this worker's tasks

    deliver_soon(ctx.engine, publisher(celery, DELIVER), task_id)
