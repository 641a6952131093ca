"""Fixtures for the LLM passthrough: the gateway on a real loopback port.

The fake upstream, `llm_upstream`, is in tests/conftest.py.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from app.core.models import Account, LedgerEntry, UsageRecord
from tests.servers import ThreadedServer


@pytest.fixture(autouse=True)
def _close_sdk_clients(monkeypatch):
    """Every SDK client a test makes (the README's examples included) is closed when the test ends.

    An unclosed client keeps its connection to the gateway until the garbage collector
    finds it, and the ResourceWarning then fails whichever test happens to be running.
    """
    import anthropic
    import openai
    from google import genai

    made = []
    for cls in (openai.OpenAI, anthropic.Anthropic, genai.Client):
        def tracking(self, *args, _init=cls.__init__, **kwargs):
            _init(self, *args, **kwargs)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", tracking)
    yield
    for client in made:
        client.close()


@pytest.fixture(scope="session")
def gateway(database, llm_upstream):
    """The app served by uvicorn on loopback, as SDKs and agents reach it."""
    from app.http.app import create_app

    app = create_app()
    with ThreadedServer(app, log_level="critical", limit_concurrency=2000, backlog=2048) as server:
        # Idle hold pools go back quickly, so tests see `held` return to zero soon.
        app.state.services.llm.holds.idle_seconds = 0.3
        yield server


@pytest.fixture(scope="session")
def base(gateway) -> str:
    return gateway.url + "/llm-api"


def usage_rows(engine, account_id: int, count: int = 1, timeout: float = 10.0) -> list:
    """The account's usage records, newest first, once at least `count` are written."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            rows = conn.execute(select(UsageRecord).where(UsageRecord.account_id == account_id)
                                .order_by(UsageRecord.created_at.desc())).all()
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(rows)} usage records for account {account_id}, expected {count}")
        time.sleep(0.02)


def url_of(engine) -> str:
    """The engine's database URL, password included (for a usage writer of the tests' own)."""
    return engine.url.render_as_string(hide_password=False)


def money_state(engine, account_id: int) -> tuple[int, int, int]:
    """(balance, held, sum of ledger rows) of an account."""
    with engine.connect() as conn:
        balance, held = conn.execute(select(Account.balance, Account.held).where(Account.id == account_id)).one()
        total = sum(conn.execute(select(LedgerEntry.amount).where(LedgerEntry.account_id == account_id)).scalars())
    return balance, held, total
