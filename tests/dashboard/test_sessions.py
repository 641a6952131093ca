"""Dashboard sessions are rows the server can end, and the sign-in limit cannot lock the owner out.

Several browsers are several test clients of the one running app, each with its own cookie jar and,
where it matters, its own client address (Starlette's TestClient `client=`, the ASGI scope's client).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select
from starlette.testclient import TestClient

from app import cli
from app.core import accounts
from app.core.models import DashboardSession, utcnow
from app.dashboard import sessions
from tests.dashboard.conftest import User, csrf_of, sign_in


@contextmanager
def browser(web: TestClient, host: str = "testclient") -> Iterator[TestClient]:
    """Another browser at client address `host`, on the same running app. It shares `web`'s event
    loop (its portal): the app's engine and pools live on that loop."""
    other = TestClient(web.app, client=(host, 50000))
    other.portal = web.portal
    try:
        yield other
    finally:
        other.portal = None
        other.close()


def _rows(engine, account_id: int) -> list:
    with engine.connect() as conn:
        return conn.execute(select(DashboardSession).where(DashboardSession.account_id == account_id)).all()


def _signed_in(client: TestClient) -> bool:
    response = client.get("/dashboard/keys", follow_redirects=False)
    assert response.status_code in (200, 303), response.text
    return response.status_code == 200


# -- sessions are rows ----------------------------------------------------------------------------

def test_a_cookie_saved_before_sign_out_opens_nothing_after(web, signed_in):
    saved = web.cookies.get(sessions.COOKIE)
    assert _signed_in(web)
    token = csrf_of(web.get("/dashboard/keys").text)
    assert web.post("/dashboard/logout", data={"csrf": token}, follow_redirects=False).status_code == 303
    web.cookies.clear()
    web.cookies.set(sessions.COOKIE, saved, path=sessions.COOKIE_PATH)  # the copy taken while signed in
    response = web.get("/dashboard/keys", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/dashboard/login")


def test_signed_in_sessions_are_rows_keyed_by_a_hash_and_strangers_have_none(web, user, engine):
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(DashboardSession)).scalar_one()
    web.get("/dashboard/login")
    web.get("/dashboard/", follow_redirects=False)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(DashboardSession)).scalar_one() == before
    assert web.cookies.get(sessions.COOKIE)  # a stranger still has a (cookie-only) session: the CSRF token

    assert sign_in(web, user).status_code == 303
    [row] = _rows(engine, user.id)
    token = web.app.state.services.signer.loads(web.cookies.get(sessions.COOKIE)).token
    assert row.id == accounts.session_id(token) != token  # the token itself is stored nowhere
    assert row.revoked_at is None and row.created_at.tzinfo is not None
    assert row.expires_at - row.created_at == timedelta(seconds=sessions.MAX_AGE)


def test_sign_out_revokes_the_row_and_a_new_sign_in_replaces_the_old_session(web, user, engine):
    assert sign_in(web, user).status_code == 303
    assert sign_in(web, user).status_code == 303  # again, in the same browser
    first, second = sorted(_rows(engine, user.id), key=lambda row: row.created_at)
    assert first.revoked_at is not None and second.revoked_at is None
    token = csrf_of(web.get("/dashboard/").text)
    web.post("/dashboard/logout", data={"csrf": token})
    [row] = [row for row in _rows(engine, user.id) if row.id == second.id]
    assert row.revoked_at is not None and row.expires_at <= utcnow()


def test_sign_out_everywhere_ends_every_session_of_the_account(web, make_user, engine):
    owner, neighbour = make_user(), make_user()
    with browser(web) as laptop, browser(web) as phone, browser(web) as theirs:
        for client, who in ((laptop, owner), (phone, owner), (theirs, neighbour)):
            assert sign_in(client, who).status_code == 303
        page = laptop.get("/dashboard/keys")
        assert "signed in to this dashboard in 2 browsers" in page.text
        assert laptop.post("/dashboard/logout/everywhere", data={}).status_code == 403  # the CSRF token is needed
        assert _signed_in(phone)
        done = laptop.post("/dashboard/logout/everywhere", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
        assert done.status_code == 303 and done.headers["location"] == "/dashboard/login?msg=signed-out-everywhere"
        assert "Every session of your account was signed out" in laptop.get(done.headers["location"]).text
        assert not _signed_in(laptop) and not _signed_in(phone)
        assert _signed_in(theirs)  # another account's session is untouched
        assert all(row.revoked_at is not None for row in _rows(engine, owner.id))
        assert sign_in(phone, owner).status_code == 303 and _signed_in(phone)  # and signing in again works


def test_a_password_set_with_the_cli_ends_the_accounts_sessions(web, signed_in, engine, monkeypatch):
    assert _signed_in(web)
    answers = iter(["a brand new password", "a brand new password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    cli.main(["accounts", "set-password", signed_in.email])
    assert not _signed_in(web)
    assert all(row.revoked_at is not None for row in _rows(engine, signed_in.id))
    new = User(signed_in.id, signed_in.email, signed_in.key, "a brand new password")
    assert sign_in(web, new).status_code == 303 and _signed_in(web)


def test_finished_sessions_are_deleted_a_day_later(make_account, engine):
    from workers.tasks import delete_finished_sessions

    account = make_account()
    now = utcnow()
    ages = {"expired-2d": (now - timedelta(days=16), now - timedelta(days=2), None),
            "revoked-2d": (now - timedelta(days=3), now - timedelta(days=2), now - timedelta(days=2)),
            "expired-1h": (now - timedelta(days=14), now - timedelta(hours=1), None),
            "live": (now, now + timedelta(days=14), None)}
    with engine.begin() as conn:
        for name, (created, expires, revoked) in ages.items():
            conn.execute(insert(DashboardSession).values(id=accounts.session_id(name + str(account.id)),
                                                         account_id=account.id, created_at=created,
                                                         expires_at=expires, revoked_at=revoked))
    assert delete_finished_sessions(engine) >= 2
    left = {row.id for row in _rows(engine, account.id)}
    assert left == {accounts.session_id(name + str(account.id)) for name in ("expired-1h", "live")}


# -- the sign-in limit ----------------------------------------------------------------------------

@pytest.fixture
def limiter(app):
    """A fresh limiter with small budgets: 2 failures per address and email, 4 per address, 5 per email."""
    found = app.state.services
    before, found.limiter = found.limiter, sessions.LoginLimiter(per_pair=2, per_address=4, per_email=5)
    yield found.limiter
    found.limiter = before


def _fail(client: TestClient, email: str) -> int:
    page = client.get("/dashboard/login")
    return client.post("/dashboard/login", data={"csrf": csrf_of(page.text), "email": email,
                                                 "password": "not the password"}).status_code


def test_failures_from_one_address_do_not_stop_the_owner_at_another(web, user, limiter):
    with browser(web, "10.0.0.1") as attacker, browser(web, "10.0.0.2") as owner:
        assert [_fail(attacker, user.email) for _ in range(3)] == [401, 401, 429]
        response = sign_in(owner, user)
        assert response.status_code == 303, response.text
        assert _signed_in(owner)
        assert sign_in(attacker, user).status_code == 429  # the attacker's address waits, even with the password


def test_one_address_is_limited_across_emails(web, make_user, limiter):
    users = [make_user() for _ in range(3)]
    with browser(web, "10.0.1.1") as attacker:
        assert [_fail(attacker, u.email) for u in users[:2] for _ in range(2)] == [401] * 4
        limited = sign_in(attacker, users[2])  # a third email, with its right password
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0


def test_a_guess_spread_over_addresses_is_stopped_per_account_but_the_owners_browser_gets_in(web, user, limiter):
    with browser(web, "10.0.2.9") as owner:
        assert sign_in(owner, user).status_code == 303  # the owner signed in here before ...
        owner.post("/dashboard/logout", data={"csrf": csrf_of(owner.get("/dashboard/").text)})
        for n in range(5):  # ... then 5 addresses guess once each
            with browser(web, f"10.0.2.{n}") as guesser:
                assert _fail(guesser, user.email) == 401
        with browser(web, "10.0.2.100") as stranger:
            assert _fail(stranger, user.email) == 429  # the account's budget is spent for new browsers
            assert sign_in(stranger, user).status_code == 429
        assert sign_in(owner, user).status_code == 303  # a browser that signed in to it before is let past
        assert _signed_in(owner)


def test_the_known_browser_mark_is_signed(web, user, make_user, limiter):
    # A cookie claiming "signed in to this account before" is worth nothing unless this server made it.
    other = make_user()
    forged = sessions.Signer(b"another server's key").dumps(sessions.Session(last_account=user.id))
    for n in range(5):
        with browser(web, f"10.0.3.{n}") as guesser:
            assert _fail(guesser, user.email) == 401
    with browser(web, "10.0.3.100") as stranger:
        stranger.cookies.set(sessions.COOKIE, forged, path=sessions.COOKIE_PATH)
        assert sign_in(stranger, user).status_code == 429
        assert sign_in(stranger, other).status_code == 303  # other accounts are not held by it


def test_the_known_browser_mark_is_worth_nothing_after_a_password_change(web, user, limiter, engine):
    # Whoever once signed in (before a reset, say) must not keep guessing past the per-account limit.
    from app.core import accounts, passwords

    with browser(web, "10.0.4.9") as former:
        assert sign_in(former, user).status_code == 303
        former.post("/dashboard/logout", data={"csrf": csrf_of(former.get("/dashboard/").text)})
        with engine.begin() as conn:
            accounts.set_password_hash(conn, user.id, passwords.hash_password("a new password, long enough"))
        for n in range(5):
            with browser(web, f"10.0.4.{n}") as guesser:
                assert _fail(guesser, user.email) == 401
        assert _fail(former, user.email) == 429  # the old mark no longer lets it past
