"""Passwords, session cookies, the login limiter, charts and the pricing table: no server needed."""

from __future__ import annotations

import time
from datetime import date, timedelta

import pytest

from app.core import money, passwords
from app.dashboard import charts, pricing, sessions


def test_password_hash_verifies_only_the_password():
    stored = passwords.hash_password("hunter2hunter2")
    assert stored.startswith("scrypt$32768$8$1$")
    assert passwords.verify("hunter2hunter2", stored)
    assert not passwords.verify("hunter2hunter3", stored)
    assert not passwords.verify("hunter2hunter2", None)  # an account without a password
    assert not passwords.verify("hunter2hunter2", "md5$abc")
    assert passwords.hash_password("hunter2hunter2") != stored  # salted


def test_password_strength():
    with pytest.raises(passwords.PasswordError):
        passwords.hash_password("short")
    with pytest.raises(passwords.PasswordError):
        passwords.hash_password("x" * 2000)


def test_session_cookie_round_trip_and_tampering():
    signer = sessions.Signer(b"k" * 32)
    session = sessions.Session(token="t0ken", last_account=7)
    cookie = signer.dumps(session)
    loaded = signer.loads(cookie)
    assert (loaded.token, loaded.last_account, loaded.csrf) == ("t0ken", 7, session.csrf)
    anonymous = signer.loads(signer.dumps(sessions.Session()))
    assert anonymous.token is None and anonymous.last_account is None

    payload, mac = cookie.rsplit(".", 1)
    forged = sessions.Signer(b"k" * 32).dumps(sessions.Session(token="another", last_account=8))
    assert signer.loads(forged.rsplit(".", 1)[0] + "." + mac) is None  # another payload, the old MAC
    assert signer.loads(cookie[:-2] + ("AA" if cookie[-2:] != "AA" else "BB")) is None
    assert sessions.Signer(b"other" * 8).loads(cookie) is None  # another server's key
    assert signer.loads("garbage") is None and signer.loads(None) is None


def test_session_expires():
    signer = sessions.Signer(b"k" * 32)
    old = sessions.Session(token="t0ken", issued_at=int(time.time()) - sessions.MAX_AGE - 5)
    assert signer.loads(signer.dumps(old)) is None


def test_csrf_compare():
    session = sessions.Session()
    assert sessions.csrf_ok(session, session.csrf)
    assert not sessions.csrf_ok(session, None)
    assert not sessions.csrf_ok(session, "")
    assert not sessions.csrf_ok(session, session.csrf + "x")


def test_secret_key_is_made_once_and_kept(tmp_path):
    from app.core.settings import Settings

    settings = Settings.from_env({"MEDIAGATE_DATA_DIR": str(tmp_path)})
    first = sessions.secret_key(settings)
    assert len(first) >= 32 and sessions.secret_key(settings) == first
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    configured = Settings.from_env({"MEDIAGATE_DATA_DIR": str(tmp_path), "MEDIAGATE_SECRET_KEY": "s3cret"})
    assert sessions.secret_key(configured) == b"s3cret"


def test_login_limiter_by_address_and_email():
    limiter = sessions.LoginLimiter(per_pair=3, per_address=5, per_email=8, window=60)
    for _ in range(3):
        assert limiter.retry_after("a@x", "1.1.1.1") == 0
        limiter.failed("a@x", "1.1.1.1")
    assert 0 < limiter.retry_after("a@x", "1.1.1.1") <= 61  # that email from that address
    assert limiter.retry_after("a@x", "2.2.2.2") == 0  # another address is not held by it
    assert limiter.retry_after("b@x", "1.1.1.1") == 0  # that address still has budget for others
    limiter.failed("b@x", "1.1.1.1")
    limiter.failed("c@x", "1.1.1.1")
    assert limiter.retry_after("d@x", "1.1.1.1") > 0  # the address is spent
    limiter.succeeded("a@x", "1.1.1.1")
    assert limiter.retry_after("a@x", "1.1.1.1") > 0  # signing in clears the pair, not the address
    assert limiter.retry_after("a@x", "3.3.3.3") == 0


def test_login_limiter_per_email_stops_a_spread_guess_but_not_a_known_browser():
    limiter = sessions.LoginLimiter(per_pair=3, per_address=5, per_email=8, window=60)
    for n in range(8):  # 8 addresses, one guess each
        limiter.failed("a@x", f"10.0.0.{n}")
    assert limiter.retry_after("a@x", "10.9.9.9") > 0  # a fresh address is held too
    assert limiter.retry_after("a@x", "10.9.9.9", known_browser=True) == 0  # the owner's browser is not
    assert limiter.retry_after("b@x", "10.9.9.9") == 0
    limiter.succeeded("a@x", "10.9.9.9")
    assert limiter.retry_after("a@x", "10.9.9.8") > 0  # and the owner's success resets nothing for others


def test_login_limiter_window_slides():
    limiter = sessions.LoginLimiter(per_pair=1, per_address=10, window=0.2)
    limiter.failed("a@x", "ip")
    assert limiter.retry_after("a@x", "ip") > 0
    time.sleep(0.25)
    assert limiter.retry_after("a@x", "ip") == 0


def test_chart_stacks_models_per_day():
    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(30)]
    series = {"gpt-4o": [0] * 30, "local-image": [0] * 30}
    series["gpt-4o"][29] = money.from_usd("0.5")
    series["local-image"][29] = money.from_usd("0.25")
    series["local-image"][3] = money.from_usd("0.1")
    chart = charts.daily_spend(days, series)
    svg = str(chart["svg"])
    assert svg.count("<rect") == 3
    assert "2025-01-30 · gpt-4o: $0.50000" in svg and "2025-01-04 · local-image: $0.10000" in svg
    assert [name for name, _, _ in chart["legend"]] == ["gpt-4o", "local-image"]
    assert chart["legend"][1][2] == money.from_usd("0.35")
    assert "$0.80" in svg  # the top tick: 4 steps of $0.20 over a $0.75 peak


def test_chart_empty_and_many_models():
    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(30)]
    assert "No spend" in str(charts.daily_spend(days, {})["svg"])
    many = {f"m{i}": [i + 1] + [0] * 29 for i in range(12)}
    legend = charts.daily_spend(days, many)["legend"]
    assert len(legend) == len(charts.PALETTE)
    assert legend[-1][0] == "other models (5)" and legend[-1][2] == sum(range(1, 6))


def test_nice_steps():
    assert charts._nice_step(75) == 20
    assert charts._nice_step(4) == 1
    assert charts._nice_step(1_000_000_001) == 500_000_000


def test_prices_render_as_written():
    assert pricing.price(money.from_usd("2.50")) == "$2.50"
    assert pricing.price(money.from_usd("10")) == "$10.00"
    assert pricing.price(money.from_usd("0.075")) == "$0.075"
    assert pricing.price(money.from_usd("0.012")) == "$0.012"
    assert pricing.price(None) == ""


def test_base_urls_follow_the_public_url():
    rows = {row["api"]: row for row in pricing.base_urls("https://gw.example.com/")}
    assert rows["chat"]["base_url"] == "https://gw.example.com/llm-api/v1"
    assert rows["responses"]["base_url"] == "https://gw.example.com/llm-api/api.openai.com/v1"
    assert rows["messages"]["base_url"] == "https://gw.example.com/llm-api/anthropic"
    assert rows["messages"]["endpoint"] == "POST /v1/messages"
    assert rows["gemini"]["base_url"] == "https://gw.example.com/llm-api"
