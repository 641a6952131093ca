"""An image task as the API shows it: its states, and the one JSON shape of a task.

Below both app.images (which makes and reads tasks) and app.webhooks (whose events carry
the task as it ended), so that neither has to import the other to render one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import RowMapping

from app.core import money
from app.core.models import iso

TERMINAL = ("completed", "failed", "canceled")
STATUSES = ("pending", "processing", *TERMINAL)


def render(task: RowMapping) -> dict[str, Any]:
    """The one JSON shape of a task: GET /v1/tasks/{id}, lists and webhook payloads."""
    body = {
        "task_id": task["id"],
        "status": task["status"],
        "model": task["model"],
        "charge": money.render(task["charge"]),
        "prompt": task["prompt"],
        "size": task["size"],
        "resolution": task["resolution"],
        "n": task["n"],
        "created_at": iso(task["created_at"]),
        "updated_at": iso(task["updated_at"]),
        "finished_at": iso(task["finished_at"]),
        "refunded": bool(task["refunded"]),
    }
    if task["status"] == "completed":
        body["result"] = {"urls": list(task["result_urls"] or [])}
    if task["status"] in ("failed", "canceled"):
        body["error"] = {"code": task["error_code"], "message": task["error_message"]}
    if task["webhook_url"]:
        body["webhook_url"] = task["webhook_url"]
    return body
