"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright) against the app on loopback.

One flow, as a person would use it: sign in (after a wrong password), create a key and copy it, call the
API with it (an image task on the real worker, a chat completion through the passthrough to a fake
upstream), see both on the pages, download the CSV, rotate the webhook secret, top up as an admin,
revoke the key and see the API refuse it; then every page at a phone's width; then sign out (a copy of
the cookie taken before opens nothing after), and sign out everywhere from one of two browsers.
Screenshots of each page go to test-artifacts/dashboard/ (git ignores it).
"""

from __future__ import annotations

import csv
import dataclasses
import re
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from sqlalchemy import select

from app.core import money
from app.core.models import Account, LedgerEntry, UsageRecord
from app.images.dimensions import dimensions
from tests.conftest import CATALOG, LLM_UPSTREAM, ROOT, wait_for_task
from tests.servers import ThreadedServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
PAGES = {"overview": "/dashboard/", "keys": "/dashboard/keys", "usage": "/dashboard/usage",
         "tasks": "/dashboard/tasks", "models": "/dashboard/models", "webhooks": "/dashboard/webhooks",
         "admin": "/dashboard/admin"}


@pytest.fixture(scope="module")
def llm_fake():
    """The passthrough's fake upstream (tests/fakes/llm.py) on a port of this module's own, so it never
    competes with tests/proxy's instance for LLM_PORT."""
    from tests.fakes.llm import FakeLLMUpstream

    fake = FakeLLMUpstream()
    with ThreadedServer(fake, log_level="critical") as server:
        yield server


@pytest.fixture(scope="module")
def live(settings, database, llm_fake, tmp_path_factory):
    """create_app() served by uvicorn on loopback, its LLM models pointed at this module's fake upstream."""
    from app.http.app import create_app

    catalog = tmp_path_factory.mktemp("dashboard") / "catalog.toml"
    catalog.write_text(CATALOG.replace(LLM_UPSTREAM, llm_fake.url))
    with ThreadedServer(create_app(dataclasses.replace(settings, catalog_path=catalog))) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh (make test does)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class Problems:
    """Script errors and console errors (a CSP violation is one) seen by a page."""

    def __init__(self, page):
        self.seen: list[str] = []
        self.expected: list[str] = []  # pages answered with an error status on purpose
        page.on("pageerror", lambda exc: self.seen.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: self.seen.append(f"console: {msg.text} at {msg.location.get('url')}")
                if msg.type == "error" else None)


    def unexpected(self) -> list[str]:
        return [p for p in self.seen
                if not any(p.startswith("console: Failed to load resource") and p.endswith(f" at {url}")
                           for url in self.expected)]


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sign_in(page, base: str, email: str, password: str) -> None:
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("form.stack button[type=submit]")


def test_dashboard_flow(live, browser, worker, client, make_user, make_account, engine):
    user = make_user(balance="10", admin=True)
    base = live.url
    context = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id="Asia/Tokyo",
                                  accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = context.new_page()
    problems = Problems(page)

    # Strangers are sent to sign in; a wrong password is refused.
    page.goto(base + "/")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
    sign_in(page, base, user.email, "not my password at all")
    expect(page.locator(".alert")).to_have_text("Wrong email or password.")
    problems.expected.append(base + "/dashboard/login")  # answered 401
    shot(page, "login-refused")
    sign_in(page, base, user.email, user.password)
    expect(page).to_have_url(base + "/dashboard/")
    expect(page.locator("#tz-name")).to_have_text("Asia/Tokyo")
    tz_cookie = next(c for c in context.cookies() if c["name"] == "tz")
    assert {"name": "tz", "value": "Asia/Tokyo"}.items() <= tz_cookie.items()
    session_cookie = next(c for c in context.cookies() if c["name"] == "mediagate_session")
    assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Lax"

    # Create a key: shown once, copied with the button.
    page.click("nav >> text=API keys")
    page.fill("input[name=name]", "browser test")
    page.click("text=Create key")
    key = page.text_content("#new-key").strip()
    assert key.startswith("llm_") and len(key) >= 36
    page.click("button[data-copy='#new-key']")
    expect(page.locator("button[data-copy='#new-key']")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == key
    shot(page, "keys-created")

    # Use it: an image task on the real worker, and a chat completion through the passthrough.
    api = httpx.Client(base_url=base + "/llm-api", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    submitted = api.post("/v1/images/generations", json={"model": "local-image", "size": "16:9",
                                                          "prompt": "A lighthouse on a cliff at dawn, 灯塔"})
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]
    task = wait_for_task(api, {}, task_id)
    assert task["status"] == "completed", task
    chat = api.post("/v1/chat/completions", json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "Hello! [in:1000] [out:50]"}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    chat_cost = money.from_usd("0.0025") + money.from_usd("0.0005")  # 1000 in at $2.50/M, 50 out at $10/M
    record_id = wait_for(lambda: _usage_id(engine, user.id), what="the usage record")

    # The overview shows both, and the balance they left.
    page.goto(base + "/dashboard/")
    expect(page.locator("#balance")).to_have_text("$" + money.render(money.from_usd("10") - money.from_usd("0.001")
                                                                     - chat_cost))
    expect(page.locator("#spend-today")).to_have_text("$" + money.render(money.from_usd("0.001") + chat_cost))
    expect(page.locator("#recent-usage")).to_contain_text("gpt-4o")
    expect(page.locator(f"#recent-tasks a[href='/dashboard/tasks/{task_id}']")).to_be_visible()
    assert page.locator("svg.chart rect").count() == 2  # today's bar: one slice per model
    recent = page.locator("#recent-tasks img")
    recent.scroll_into_view_if_needed()  # thumbnails load lazily
    wait_for(lambda: recent.evaluate("img => img.complete && img.naturalWidth > 0"), what="the thumbnail")
    shot(page, "overview")

    # The gallery's thumbnail and the task page's full image.
    page.click("nav >> text=Image tasks")
    thumb = page.locator(f"a[href='/dashboard/tasks/{task_id}'] img")
    expect(thumb).to_be_visible()
    wait_for(lambda: thumb.evaluate("img => img.complete && img.naturalWidth > 0"), what="the thumbnail")
    width, height = thumb.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width == 384 and abs(width / height - 16 / 9) < 0.02
    shot(page, "tasks")
    thumb.click()
    expect(page).to_have_url(base + f"/dashboard/tasks/{task_id}")
    full = page.locator("img.full")
    wait_for(lambda: full.evaluate("img => img.complete && img.naturalWidth > 0"), what="the full image")
    assert tuple(full.evaluate("img => [img.naturalWidth, img.naturalHeight]")) == dimensions("16:9", "1k")
    expect(page.locator("#url-0")).to_have_text(task["result"]["urls"][0])
    expect(page.locator(".facts")).to_contain_text("A lighthouse on a cliff at dawn, 灯塔")
    shot(page, "task")

    # Usage: the chat completion's row, and the CSV of the same filter.
    page.click("nav >> text=Usage")
    row = page.locator(f"tr[data-id='{record_id}']")
    expect(row).to_contain_text("gpt-4o")
    expect(row).to_contain_text("1,000")
    expect(row).to_contain_text("$" + money.render(chat_cost))
    expect(row).to_contain_text("browser test")
    page.select_option("select[name=model]", "gpt-4o")
    page.click("#usage-filter button[type=submit]")
    expect(page).to_have_url(re.compile(r"model=gpt-4o"))
    shot(page, "usage")
    with page.expect_download() as download_info:
        page.click("#csv-link")
    download = download_info.value
    assert download.suggested_filename.startswith("mediagate-usage-")
    with open(download.path(), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["id"], r["model"], r["api_format"], r["input_tokens"], r["output_tokens"], r["key_prefix"])
            for r in rows] == [(record_id, "gpt-4o", "chat", "1000", "50", key[:12])]
    assert money.from_usd(rows[0]["cost"]) == chat_cost

    # Models and pricing, with the base URLs of this server.
    page.click("nav >> text=Models")
    expect(page.locator("#base-urls tr[data-api='messages']")).to_contain_text(
        live_public_url(client) + "/llm-api/anthropic")
    expect(page.locator("#llm-models tr[data-model='gpt-4o']")).to_contain_text("$2.50")
    expect(page.locator("#image-models tr[data-model='local-image']")).to_contain_text("4k: $0.004")
    shot(page, "models")

    # Webhooks: the secret on request, then rotated.
    page.click("nav >> text=Webhooks")
    page.click("text=Show secret")
    secret = page.text_content("#webhook-secret").strip()
    assert secret.startswith("whsec_")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("text=Rotate secret")
    expect(page.locator(".notice")).to_contain_text("A new secret is in use")
    rotated = page.text_content("#webhook-secret").strip()
    assert rotated.startswith("whsec_") and rotated != secret
    shot(page, "webhooks")

    # Admin: a top-up with a note, as a ledger row.
    page.click("nav >> text=Admin")
    page.fill("input[name=q]", user.email)
    page.click("text=Search")
    account_row = page.locator(f"tr[data-email='{user.email}']")
    account_row.locator("input[name=amount]").fill("5")
    account_row.locator("input[name=note]").fill("browser top-up")
    account_row.locator("text=Add").click()
    expect(page.locator(".notice")).to_have_text("The balance was topped up.")
    with engine.connect() as conn:
        note = conn.execute(select(LedgerEntry.note).where(LedgerEntry.account_id == user.id,
                                                           LedgerEntry.kind == "topup")
                            .order_by(LedgerEntry.id.desc())).scalars().first()
        balance = conn.execute(select(Account.balance).where(Account.id == user.id)).scalar_one()
    assert note == f"browser top-up (by {user.email})"
    assert balance == money.from_usd("15") - money.from_usd("0.001") - chat_cost
    shot(page, "admin")

    # Another account's task: refused like a missing one.
    other = make_account()
    theirs = httpx.post(base + "/v1/images/generations", headers=other.headers, timeout=30,
                        json={"model": "local-image", "prompt": "not yours"}).json()["task_id"]
    response = page.goto(base + f"/dashboard/tasks/{theirs}")
    assert response.status == 404
    problems.expected.append(base + f"/dashboard/tasks/{theirs}")
    expect(page.locator("h1")).to_have_text("No such task")
    assert "not yours" not in page.content()

    # Revoke the key; the API refuses it.
    page.goto(base + "/dashboard/keys")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f"tr[data-prefix='{key[:12]}'] button.danger").click()
    expect(page.locator(".notice")).to_contain_text("The key was revoked")
    expect(page.locator(f"tr[data-prefix='{key[:12]}']")).to_contain_text("revoked")
    refused = api.get("/v1/balance")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert api.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": []}).status_code == 401
    shot(page, "keys-revoked")
    api.close()

    # Every page at a phone's width: nothing wider than the screen.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                has_touch=True, timezone_id="Asia/Tokyo", storage_state=context.storage_state())
    phone_page = phone.new_page()
    phone_problems = Problems(phone_page)
    for name, path in {**PAGES, "task": f"/dashboard/tasks/{task_id}"}.items():
        phone_page.goto(base + path)
        expect(phone_page.locator("main h1").first).to_be_visible()
        overflow = phone_page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} is {overflow}px wider than a phone"
        shot(phone_page, f"phone-{name}")
    phone_page.goto(base + "/dashboard/login")  # signed in: sent on to the overview
    expect(phone_page).to_have_url(base + "/dashboard/")
    phone.close()
    stranger = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    stranger_page = stranger.new_page()
    stranger_page.goto(base + "/dashboard/login")
    assert stranger_page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    shot(stranger_page, "phone-login")
    stranger.close()

    # Sign out: the session ends on the server, so a copy of the cookie taken before opens nothing.
    saved = context.storage_state()
    page.click("text=Sign out")
    expect(page).to_have_url(re.compile(r"/dashboard/login$"))
    page.goto(base + "/dashboard/keys")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
    shot(page, "login")
    context.close()
    copied = browser.new_context(storage_state=saved)
    copied_page = copied.new_page()
    copied_page.goto(base + "/dashboard/keys")
    expect(copied_page).to_have_url(re.compile(r"/dashboard/login\?next="))
    copied.close()

    # Sign out everywhere, from one of two browsers: both are signed out.
    pages = [browser.new_context().new_page() for _ in range(2)]
    for each in pages:
        each.goto(base + "/dashboard/login")
        sign_in(each, base, user.email, user.password)
        expect(each).to_have_url(base + "/dashboard/")
    pages[0].goto(base + "/dashboard/keys")
    expect(pages[0].locator("#sessions")).to_contain_text("in 2 browsers")
    pages[0].once("dialog", lambda dialog: dialog.accept())
    pages[0].click("text=Sign out everywhere")
    expect(pages[0].locator(".notice")).to_contain_text("Every session of your account was signed out")
    pages[1].goto(base + "/dashboard/keys")
    expect(pages[1]).to_have_url(re.compile(r"/dashboard/login\?next="))
    for each in pages:
        each.context.close()
    assert problems.unexpected() == [] and phone_problems.unexpected() == []


def live_public_url(client) -> str:
    return client.app.state.services.settings.public_url


def _usage_id(engine, account_id: int) -> str | None:
    with engine.connect() as conn:
        return conn.execute(select(UsageRecord.id).where(UsageRecord.account_id == account_id)).scalar()
