"""Dashboard fixtures: accounts with passwords, a signed-in test client, rows as the other modules write them."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

PASSWORD = "correct horse battery staple"


@dataclass
class User:
    id: int
    email: str
    key: str
    password: str = PASSWORD

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def make_user(make_account, engine):
    from app.core import accounts, passwords

    def make(balance: str = "10", admin: bool = False) -> User:
        acc = make_account(balance)
        with engine.begin() as conn:
            accounts.set_password_hash(conn, acc.id, passwords.hash_password(PASSWORD))
            if admin:
                accounts.set_admin(conn, acc.id)
        return User(acc.id, acc.email, acc.key)

    return make


@pytest.fixture
def user(make_user) -> User:
    return make_user()


@pytest.fixture
def web(client):
    """The app's test client with an empty cookie jar (tests sign in as whom they need)."""
    client.cookies.clear()
    yield client
    client.cookies.clear()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def sign_in(web, user: User, password: str | None = None):
    page = web.get("/dashboard/login")
    return web.post("/dashboard/login", data={"csrf": csrf_of(page.text), "email": user.email,
                                              "password": password or user.password}, follow_redirects=False)


@pytest.fixture
def signed_in(web, user):
    response = sign_in(web, user)
    assert response.status_code == 303, response.text
    return user


def add_usage(engine, account_id: int, *, model: str = "gpt-4o", cost: int = 1000, key_id: int | None = None,
              at: datetime | None = None, **fields) -> str:
    """A usage record as the LLM passthrough writes it."""
    from app.core.models import UsageRecord

    record_id = "req_" + secrets.token_hex(8)
    values = dict(id=record_id, account_id=account_id, api_key_id=key_id, model=model, api_format="chat",
                  stream=False, input_tokens=12, output_tokens=34, cached_tokens=0, reasoning_tokens=0,
                  usage_reported=True, cost=cost, upstream_status=200, latency_ms=120, ttfb_ms=80,
                  client_disconnected=False, created_at=at or datetime.now(UTC))
    values.update(fields)
    with engine.begin() as conn:
        conn.execute(UsageRecord.__table__.insert().values(**values))
    return record_id


def add_task(engine, account_id: int, *, model: str = "local-image", charge: int = 1_000_000,
             status: str = "completed", at: datetime | None = None, refunded: bool = False, **fields) -> str:
    """An image task row as the task service writes it (its charge is not debited here)."""
    from app.core.models import ImageTask

    task_id = "media_" + secrets.token_hex(12)
    now = at or datetime.now(UTC)
    values = dict(id=task_id, account_id=account_id, model=model, prompt="a red fox in the snow", size="1:1",
                  resolution="1k", n=1, image_urls=[], charge=charge, status=status, refunded=refunded,
                  created_at=now, updated_at=now)
    values.update(fields)
    with engine.begin() as conn:
        conn.execute(ImageTask.__table__.insert().values(**values))
    return values["id"]
