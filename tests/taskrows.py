"""Task rows made directly in the database, for tests that need a task to hold still.

A "parked" task is submitted (charged, as the API does) and marked dispatched, so
the relay leaves it alone and no worker takes it up: it stays `pending` until the
test moves it (the sweep would re-dispatch it only after `redispatch_after`, 60 s).
"""

from __future__ import annotations

import uuid

from sqlalchemy import update

from app.core.auth import Principal
from app.core.catalog import load
from app.core.models import ImageTask, utcnow
from app.core.settings import get_settings
from app.images import service
from app.images.validation import GenerationRequest


def parked_task(engine, account, *, webhook_url: str | None = None, model: str = "local-image",
                status: str = "pending") -> str:
    settings = get_settings()
    catalog = load(settings.catalog_path, settings.env)
    request = GenerationRequest(catalog.get(model, "image"), f"parked {uuid.uuid4().hex[:8]}", "1:1", "1k",
                                webhook_url=webhook_url)
    with engine.begin() as conn:
        task_id = service.submit(conn, Principal(account.id, None), request)["task_id"]
        conn.execute(update(ImageTask).where(ImageTask.id == task_id)
                     .values(dispatched_at=utcnow(), status=status))
    return task_id
