"""What happens when a task ends, besides its state: webhook events (next issue) hook in here."""

from __future__ import annotations


def task_ended(ctx, task_id: str) -> None:
    """Called once, by the winner of a task's terminal transition."""
    return None
