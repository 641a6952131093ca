"""Dashboard pages through the app's test client: sign-in, CSRF, ownership, admin, webhooks secret."""

from __future__ import annotations

import re

from sqlalchemy import select

from app.core import money
from app.core.models import Account, ApiKey, LedgerEntry, WebhookAttempt, WebhookDelivery
from app.dashboard import sessions
from tests.dashboard.conftest import PASSWORD, add_task, csrf_of, sign_in


def test_root_and_pages_send_strangers_to_sign_in(web):
    assert web.get("/", follow_redirects=False).headers["location"] == "/dashboard/"
    response = web.get("/dashboard/usage?model=gpt-4o", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/login?next=/dashboard/usage%3Fmodel%3Dgpt-4o"
    for path in ("/dashboard/", "/dashboard/keys", "/dashboard/tasks", "/dashboard/models", "/dashboard/usage.csv",
                 "/dashboard/admin", "/dashboard/webhooks"):
        assert web.get(path, follow_redirects=False).status_code == 303, path


def test_sign_in_sets_a_hardened_cookie_and_goes_next(web, user):
    page = web.get("/dashboard/login")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY"
    response = web.post("/dashboard/login", follow_redirects=False, data={
        "csrf": csrf_of(page.text), "email": user.email.upper(), "password": PASSWORD, "next": "/dashboard/keys"})
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/keys"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http here
    overview = web.get("/dashboard/")
    assert overview.status_code == 200 and user.email in overview.text
    # The sign-in rotates the CSRF token: the one from before is dead.
    assert csrf_of(overview.text) != csrf_of(page.text)


def test_cookie_is_secure_over_https(web):
    page = web.get("https://testserver/dashboard/login")
    assert "Secure" in page.headers["set-cookie"] and "HttpOnly" in page.headers["set-cookie"]


def test_wrong_password_is_refused(web, user):
    response = sign_in(web, user, "not the password")
    assert response.status_code == 401
    assert "Wrong email or password." in response.text
    assert web.get("/dashboard/", follow_redirects=False).status_code == 303  # still signed out
    unknown = web.post("/dashboard/login", data={"csrf": csrf_of(response.text), "email": "nobody@example.com",
                                                 "password": PASSWORD}, follow_redirects=False)
    assert unknown.status_code == 401 and "Wrong email or password." in unknown.text


def test_account_without_password_cannot_sign_in(web, make_account):
    acc = make_account()
    page = web.get("/dashboard/login")
    response = web.post("/dashboard/login", data={"csrf": csrf_of(page.text), "email": acc.email, "password": ""})
    assert response.status_code == 401


def test_login_is_rate_limited(web, make_user):
    target = make_user()
    web.app.state.services.limiter = sessions.LoginLimiter()  # a fresh limiter for this test's counts
    page = web.get("/dashboard/login")
    token = csrf_of(page.text)
    for _ in range(5):
        bad = web.post("/dashboard/login", data={"csrf": token, "email": target.email, "password": "wrong-password"})
        assert bad.status_code == 401
    limited = web.post("/dashboard/login", data={"csrf": token, "email": target.email, "password": PASSWORD})
    assert limited.status_code == 429 and "Too many failed sign-ins" in limited.text
    assert int(limited.headers["retry-after"]) > 0
    assert web.get("/dashboard/", follow_redirects=False).status_code == 303  # even the right password waits
    web.app.state.services.limiter = sessions.LoginLimiter()


def test_forms_without_a_csrf_token_are_refused(web, signed_in, engine):
    before = _key_count(engine, signed_in.id)
    for data in ({"name": "sneaky"}, {"name": "sneaky", "csrf": "forged"}):
        response = web.post("/dashboard/keys", data=data)
        assert response.status_code == 403 and "security token" in response.text
    assert _key_count(engine, signed_in.id) == before
    page = web.get("/dashboard/login")
    login = web.post("/dashboard/login", data={"email": signed_in.email, "password": PASSWORD})
    assert login.status_code == 403
    assert page.status_code in (200, 303)


def test_sign_out_needs_the_token_and_ends_the_session(web, signed_in):
    assert web.post("/dashboard/logout", data={}).status_code == 403
    assert web.get("/dashboard/", follow_redirects=False).status_code == 200
    token = csrf_of(web.get("/dashboard/").text)
    response = web.post("/dashboard/logout", data={"csrf": token}, follow_redirects=False)
    assert response.status_code == 303
    assert web.get("/dashboard/", follow_redirects=False).status_code == 303


def test_a_password_change_ends_old_sessions(web, signed_in, engine):
    from app.core import accounts, passwords

    assert web.get("/dashboard/", follow_redirects=False).status_code == 200
    with engine.begin() as conn:
        accounts.set_password_hash(conn, signed_in.id, passwords.hash_password("a brand new password"))
    assert web.get("/dashboard/", follow_redirects=False).status_code == 303


def test_next_cannot_leave_the_dashboard(web, user):
    page = web.get("/dashboard/login")
    for target in ("https://evil.example/", "//evil.example/dashboard", "/dashboard//evil.example"):
        response = web.post("/dashboard/login", follow_redirects=False, data={
            "csrf": csrf_of(page.text), "email": user.email, "password": PASSWORD, "next": target})
        assert response.headers["location"] == "/dashboard/", target
        page = web.get("/dashboard/login", follow_redirects=False)
        if page.status_code == 303:
            web.cookies.clear()
            page = web.get("/dashboard/login")


def test_keys_create_shows_once_and_revoke_stops_the_api(web, signed_in, engine):
    token = csrf_of(web.get("/dashboard/keys").text)
    created = web.post("/dashboard/keys", data={"csrf": token, "name": "ci runner"})
    assert created.status_code == 201
    key = re.search(r'<code id="new-key" class="secret">(llm_[^<]+)</code>', created.text).group(1)
    assert web.get("/v1/balance", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    listing = web.get("/dashboard/keys").text
    assert key not in listing and key[:12] in listing and "ci runner" in listing
    with engine.connect() as conn:
        key_id = conn.execute(select(ApiKey.id).where(ApiKey.prefix == key[:12])).scalar_one()
    revoked = web.post(f"/dashboard/keys/{key_id}/revoke", data={"csrf": token}, follow_redirects=False)
    assert revoked.status_code == 303 and revoked.headers["location"] == "/dashboard/keys?msg=revoked"
    assert web.get("/v1/balance", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert "The key was revoked" in web.get("/dashboard/keys?msg=revoked").text


def test_cannot_revoke_another_accounts_key(web, signed_in, make_account, engine):
    other = make_account()
    with engine.connect() as conn:
        other_key = conn.execute(select(ApiKey.id).where(ApiKey.account_id == other.id)).scalar_one()
    token = csrf_of(web.get("/dashboard/keys").text)
    response = web.post(f"/dashboard/keys/{other_key}/revoke", data={"csrf": token}, follow_redirects=False)
    assert response.headers["location"].endswith("msg=not-revoked")
    assert web.get("/v1/balance", headers=other.headers).status_code == 200


def test_key_name_is_required(web, signed_in):
    token = csrf_of(web.get("/dashboard/keys").text)
    response = web.post("/dashboard/keys", data={"csrf": token, "name": "  "})
    assert response.status_code == 400 and "Give the key a name" in response.text


def test_another_accounts_task_is_not_shown(web, signed_in, make_account, engine):
    other = make_account()
    theirs = add_task(engine, other.id, result_urls=["http://testserver/files/x/0.png"])
    mine = add_task(engine, signed_in.id, status="failed", refunded=True, error_code="backend_error",
                    error_message="upstream said no")
    response = web.get(f"/dashboard/tasks/{theirs}")
    assert response.status_code == 404 and "a red fox" not in response.text
    assert web.get(f"/dashboard/tasks/{theirs}/thumb/0.webp").status_code == 404
    assert theirs not in web.get("/dashboard/tasks").text
    page = web.get(f"/dashboard/tasks/{mine}")
    assert page.status_code == 200
    assert "upstream said no" in page.text and "refunded $0.00100" in page.text


def test_gallery_shows_each_webhook_delivery(web, signed_in, engine):
    from datetime import UTC, datetime

    task_id = add_task(engine, signed_in.id, webhook_url="https://hooks.example.com/mediagate")
    with engine.begin() as conn:
        conn.execute(WebhookDelivery.__table__.insert().values(
            id="msg_dash1", task_id=task_id, account_id=signed_in.id, url="https://hooks.example.com/mediagate",
            event_type="task.completed", payload="{}", status="pending", attempt_count=2,
            created_at=datetime.now(UTC)))
        for code in (500, 503):
            conn.execute(WebhookAttempt.__table__.insert().values(
                delivery_id="msg_dash1", status_code=code, duration_ms=12, attempted_at=datetime.now(UTC)))
    gallery = web.get("/dashboard/tasks").text
    assert "webhook pending · 503" in gallery
    detail = web.get(f"/dashboard/tasks/{task_id}").text
    assert detail.count("HTTP 50") == 2 and "task.completed" in detail
    recent = web.get("/dashboard/webhooks").text
    assert f"/dashboard/tasks/{task_id}" in recent and "HTTP 503" in recent


def test_task_filter_by_status(web, signed_in, engine):
    done = add_task(engine, signed_in.id)
    failed = add_task(engine, signed_in.id, status="failed", refunded=True)
    page = web.get("/dashboard/tasks?status=failed").text
    assert failed in page and done not in page


def test_webhook_secret_on_request_and_rotation(web, signed_in, engine):
    page = web.get("/dashboard/webhooks")
    assert "whsec_" not in page.text
    token = csrf_of(page.text)
    shown = web.post("/dashboard/webhooks/secret", data={"csrf": token})
    secret = re.search(r'id="webhook-secret" class="secret">(whsec_[^<]+)<', shown.text).group(1)
    with engine.connect() as conn:
        assert conn.execute(select(Account.webhook_secret).where(Account.id == signed_in.id)).scalar_one() == secret
    rotated = web.post("/dashboard/webhooks/rotate", data={"csrf": token})
    new = re.search(r'id="webhook-secret" class="secret">(whsec_[^<]+)<', rotated.text).group(1)
    assert new != secret and "A new secret is in use" in rotated.text
    with engine.connect() as conn:
        row = conn.execute(select(Account.webhook_secret, Account.previous_webhook_secret)
                           .where(Account.id == signed_in.id)).one()
    assert tuple(row) == (new, secret)
    assert web.post("/dashboard/webhooks/rotate", data={}).status_code == 403


def test_models_page_lists_the_catalog_and_base_urls(web, signed_in, app):
    page = web.get("/dashboard/models").text
    public = app.state.services.settings.public_url
    assert f"{public}/llm-api/v1</code>" in page
    assert f"{public}/llm-api/api.openai.com/v1</code>" in page
    assert f"{public}/llm-api/anthropic</code>" in page
    for model in app.state.services.catalog.models.values():
        assert f'data-model="{model.name}"' in page
    assert "1k: $0.001" in page and "4k: $0.048" in page  # local-image and gpt-image-2
    assert "2k: $0.02" in page and "4k: $0.02" not in page  # narrow-image has no 4k


def test_admin_only_for_admins(web, signed_in):
    assert web.get("/dashboard/admin").status_code == 403
    assert "Admin</a>" not in web.get("/dashboard/").text


def test_admin_tops_up_with_a_ledger_note(web, make_user, make_account, engine):
    admin = make_user(admin=True)
    customer = make_account("1")
    assert sign_in(web, admin).status_code == 303
    page = web.get(f"/dashboard/admin?q={customer.email[:10]}")
    assert customer.email in page.text and admin.email not in page.text.split("<main>")[1].split("Signed in")[0]
    token = csrf_of(page.text)
    bad = web.post("/dashboard/admin/topup", data={"csrf": token, "account_id": customer.id, "amount": "-5"})
    assert bad.status_code == 400
    missing = web.post("/dashboard/admin/topup", data={"csrf": token, "account_id": 10**9, "amount": "5"})
    assert missing.status_code == 404
    done = web.post("/dashboard/admin/topup", follow_redirects=False,
                    data={"csrf": token, "account_id": customer.id, "amount": "$2.50", "note": "invoice 42"})
    assert done.status_code == 303 and done.headers["location"].endswith("msg=topup")
    with engine.connect() as conn:
        balance = conn.execute(select(Account.balance).where(Account.id == customer.id)).scalar_one()
        entry = conn.execute(select(LedgerEntry).where(LedgerEntry.account_id == customer.id)
                             .order_by(LedgerEntry.id.desc())).first()
    assert balance == money.from_usd("3.50")
    assert entry.kind == "topup" and entry.amount == money.from_usd("2.50")
    assert entry.note == f"invoice 42 (by {admin.email})"
    assert web.post("/dashboard/admin/topup", data={"account_id": customer.id, "amount": "5"}).status_code == 403


def _key_count(engine, account_id: int) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(ApiKey.id).where(ApiKey.account_id == account_id)).all())


def test_thumbnails_are_made_once_and_cached(web, signed_in, engine, app):
    import io

    from PIL import Image

    storage, settings = app.state.services.storage, app.state.services.settings
    task_key = "media_" + "ab" * 12
    png = io.BytesIO()
    Image.new("RGB", (1600, 900), "teal").save(png, "PNG")
    url = storage.save(f"{task_key}/0.png", png.getvalue())
    task_id = add_task(engine, signed_in.id, id=task_key, result_urls=[url])
    first = web.get(f"/dashboard/tasks/{task_id}/thumb/0.webp")
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    assert "private" in first.headers["cache-control"]
    with Image.open(io.BytesIO(first.content)) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (384, 216)
    assert (settings.data_dir / "thumbs" / task_id / "0.png.384.webp").exists()
    (settings.files_dir / task_id / "0.png").unlink()  # from now on only the cache can answer
    again = web.get(f"/dashboard/tasks/{task_id}/thumb/0.webp")
    assert again.status_code == 200 and again.content == first.content
    assert web.get(f"/dashboard/tasks/{task_id}/thumb/1.webp").status_code == 404
    page = web.get(f"/dashboard/tasks/{task_id}").text
    assert f'src="/files/{task_id}/0.png"' in page and url in page  # the full image, and its public URL
