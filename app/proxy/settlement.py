"""What the usage writer applies: finished calls settled and recorded, in one transaction a batch.

Per account (and hold owner), one `ledger.settle` releases the holds of the batch's calls and
charges their metered costs as one `usage` ledger row (its reference the first call's id), and
a usage record per call carries that call's share of the charge. At low traffic a batch is
one call, so the ledger row is that call's. A batch id, written in the same transaction, makes
a batch sent again (its writer died before answering) apply once.

Run by the writer child process (app.proxy.writer); queued by app.proxy.recorder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete

from app.core import ledger
from app.core.db import insert_rows, insert_unless_exists
from app.core.models import UsageBatch, UsageRecord, utcnow

# A batch's id is kept this long: what lets a batch sent again be recognized as written.
KEEP_BATCH_IDS = timedelta(hours=1)


@dataclass
class Entry:
    """One finished call: its usage record and the hold to settle."""

    id: str
    account_id: int
    api_key_id: int | None
    model: str
    api_format: str
    stream: bool
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_reported: bool
    cost: int  # metered; what is charged may be less if the balance ran out
    upstream_status: int | None
    latency_ms: int
    ttfb_ms: int | None
    client_disconnected: bool
    created_at: datetime
    held: int  # of this process's hold row: what to release there (0 if its lease was lost)
    owner: str  # the hold row's owner (the hold pool's, when the call ended): required, or it settles none
    usage_estimated: bool = False  # charged from an estimate: the upstream's final usage never came
    channel: str | None = None  # the channel that answered (or was tried last): operators' to see
    attempts: int = 1  # channels tried


@dataclass
class Release:
    """Held balance handed back without a call (an idle hold pool)."""

    account_id: int
    held: int
    owner: str  # the hold row it comes from


def write(conn: Connection, items: list, batch_id: str | None = None) -> bool:
    """Settle and record `items` (Entry and Release) in the caller's transaction.

    With a `batch_id`, a batch already written under that id is not applied again:
    returns False then, True when written.
    """
    if batch_id is not None and not _claim(conn, batch_id):
        return False
    by_account: dict[tuple[int, str], list] = {}
    for item in items:
        by_account.setdefault((item.account_id, item.owner), []).append(item)
    rows = []
    # In account order: concurrent batches (other processes, lease renewals) lock rows in the same order.
    for (account_id, owner), batch in sorted(by_account.items()):
        entries = [item for item in batch if isinstance(item, Entry)]
        held = sum(item.held for item in batch)
        cost = sum(entry.cost for entry in entries)
        note = (f"{entries[0].model} ({entries[0].api_format})" if len(entries) == 1
                else f"LLM usage: {len(entries)} requests")
        charged = ledger.settle(conn, account_id, held, cost, owner=owner,
                                reference=entries[0].id if entries else "", note=note)
        # Each call's record carries its share of what was charged: all of its cost,
        # unless the balance ran out, and then the calls first in the batch come first.
        for entry in entries:
            row = dict(entry.__dict__)  # not asdict(): it deep-copies every field
            del row["held"], row["owner"]
            row["cost"] = min(entry.cost, charged)
            charged -= row["cost"]
            rows.append(row)
    insert_rows(conn, UsageRecord.__table__, rows)
    return True


def _claim(conn: Connection, batch_id: str) -> bool:
    """Mark the batch written, in the transaction that writes it; False if it already was."""
    return insert_unless_exists(conn, UsageBatch.__table__, ("id",), {"id": batch_id, "created_at": utcnow()})


def forget_batches(conn: Connection) -> int:
    """Delete the ids of batches written more than KEEP_BATCH_IDS ago; returns how many."""
    return conn.execute(delete(UsageBatch).where(UsageBatch.created_at < utcnow() - KEEP_BATCH_IDS)).rowcount
