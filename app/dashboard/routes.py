"""Dashboard pages at /dashboard: parse, call one service function, render."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from app.core import accounts, keys, money, params, passwords
from app.core.db import run
from app.core.errors import APIError
from app.core.models import utcnow
from app.core.taskview import STATUSES as TASK_STATUSES
from app.dashboard import charts, pricing, queries, sessions, thumbs
from app.dashboard.web import Ctx, client_address, error_page, limiter, page, safe_next
from app.proxy import history
from app.proxy.formats import FORMATS
from app.webhooks import service as webhooks

STATIC = Path(__file__).resolve().parent / "static"
MESSAGES = {  # ?msg= codes: fixed texts, so nothing from a URL is shown as a message
    "revoked": "The key was revoked. Requests with it are refused from now on.",
    "not-revoked": "That key was already revoked.",
    "topup": "The balance was topped up.",
    "signed-out-everywhere": "Every session of your account was signed out, this one included.",
}


def _message(ctx: Ctx) -> str | None:
    return MESSAGES.get(ctx.request.query_params.get("msg", ""))


def _see(path: str, msg: str | None = None) -> RedirectResponse:
    return RedirectResponse(path + (f"?msg={msg}" if msg else ""), status_code=303)


# -- signing in and out ---------------------------------------------------------------------------

@page(signed_in=False)
async def login(ctx: Ctx) -> Response:
    target = safe_next(ctx.request.query_params.get("next") or ctx.form.get("next"))
    if ctx.request.method == "GET":
        if ctx.account is not None:
            return RedirectResponse(target, status_code=303)
        return ctx.render("login.html", email="", error=None, next=target, message=_message(ctx))
    email = ctx.form.get("email", "").strip().lower()[:320]
    password = ctx.form.get("password", "")
    guard = limiter(ctx.request)
    address = client_address(ctx.request)
    found = await run(ctx.state.engine, queries.login_account, email)
    known = found is not None and sessions.knows(ctx.session, found[0], found[1])
    wait = guard.retry_after(email, address, known_browser=known)
    if wait:
        response = ctx.render("login.html", status=429, email=email, next=target, message=None,
                              error=f"Too many failed sign-ins. Try again in {(wait + 59) // 60} minute(s).")
        response.headers["Retry-After"] = str(wait)
        return response
    stored = found[1] if found else None
    # verify runs for an unknown email too (it then spends one hash's time, and is False).
    if not await run_in_threadpool(passwords.verify, password, stored) or found is None:
        guard.failed(email, address)
        return ctx.render("login.html", status=401, email=email, next=target, message=None,
                          error="Wrong email or password.")
    guard.succeeded(email, address)
    token = await run(ctx.state.engine, accounts.start_session, found[0], timedelta(seconds=sessions.MAX_AGE),
                      replaces=ctx.session.token)
    # A new session (and CSRF token) on sign-in: a token seen before it is worth nothing after.
    ctx.session = sessions.Session(token=token, last_account=found[0], last_password=passwords.fingerprint(stored),
                                   changed=True)
    return RedirectResponse(target, status_code=303)


@page(signed_in=False)
async def logout(ctx: Ctx) -> Response:
    if ctx.session.token is not None:
        await run(ctx.state.engine, accounts.end_session, ctx.session.token)
    ctx.session = sessions.Session(last_account=ctx.session.last_account, last_password=ctx.session.last_password,
                                   changed=True)
    return _see("/dashboard/login")


@page()
async def logout_everywhere(ctx: Ctx) -> Response:
    await run(ctx.state.engine, accounts.end_sessions, ctx.account_id)
    ctx.session = sessions.Session(changed=True)  # signing out everywhere forgets this browser too
    return _see("/dashboard/login", "signed-out-everywhere")


# -- overview, keys -------------------------------------------------------------------------------

@page()
async def overview(ctx: Ctx) -> Response:
    await ctx.state.llm.written()  # the recent requests include the one just made
    async with ctx.state.engine.connect() as conn:
        data = await conn.run_sync(queries.overview, ctx.account_id, ctx.tz, utcnow())
    chart = charts.daily_spend(data["spend"]["days"], data["spend"]["series"])
    return ctx.render("overview.html", chart=chart, **data)


async def _keys_page(ctx: Ctx, new_key: dict[str, str] | None = None, error: str | None = None,
                     status: int = 200) -> Response:
    async with ctx.state.engine.connect() as conn:
        rows = await conn.run_sync(queries.list_keys, ctx.account_id)
        signed_in = await conn.run_sync(accounts.count_sessions, ctx.account_id)
    return ctx.render("keys.html", status=status, keys=rows, new_key=new_key, error=error, message=_message(ctx),
                      sessions=signed_in)


@page()
async def keys_page(ctx: Ctx) -> Response:
    return await _keys_page(ctx)


@page()
async def create_key(ctx: Ctx) -> Response:
    name = ctx.form.get("name", "").strip()
    if not name or len(name) > 100:
        return await _keys_page(ctx, error="Give the key a name of 1 to 100 characters.", status=400)
    new = await run(ctx.state.engine, keys.create, ctx.account_id, name)
    # Rendered, not redirected: the key is shown this once and stored nowhere.
    return await _keys_page(ctx, new_key={"key": new.key, "name": name, "prefix": new.prefix}, status=201)


@page()
async def revoke_key(ctx: Ctx) -> Response:
    key_id = params.row_id(ctx.request.path_params["key_id"])
    revoked = key_id is not None and await run(ctx.state.engine, keys.revoke_by_id, key_id, ctx.account_id)
    if revoked:
        ctx.state.auth.forget()  # this process refuses it now; others within key_cache_seconds
    return _see("/dashboard/keys", "revoked" if revoked else "not-revoked")


# -- usage ----------------------------------------------------------------------------------------

@page()
async def usage(ctx: Ctx) -> Response:
    filters, form = queries.usage_filters(ctx.request.query_params, ctx.tz)
    cursor = ctx.request.query_params.get("before") or None
    await ctx.state.llm.written()
    async with ctx.state.engine.connect() as conn:
        try:
            rows, next_cursor = await conn.run_sync(history.page, ctx.account_id, filters, cursor=cursor)
        except APIError:  # a hand-edited cursor: start from the newest
            cursor = None
            rows, next_cursor = await conn.run_sync(history.page, ctx.account_id, filters)
        key_rows = await conn.run_sync(queries.list_keys, ctx.account_id)
    models = sorted({m.name for m in ctx.state.catalog.of_api(*FORMATS)}
                    | ({form["model"]} if form["model"] else set()))
    query = {k: v for k, v in form.items() if v}
    return ctx.render("usage.html", rows=rows, form=form, models=models, keys=key_rows, paged=cursor is not None,
                      key_names={k["id"]: k["name"] for k in key_rows}, query=urlencode(query),
                      next_url=f"?{urlencode({**query, 'before': next_cursor})}" if next_cursor else None)


@page()
async def usage_csv(ctx: Ctx) -> Response:
    filters, _ = queries.usage_filters(ctx.request.query_params, ctx.tz)
    filename = f"mediagate-usage-{date.today().isoformat()}.csv"
    await ctx.state.llm.written()
    return StreamingResponse(history.csv_pages(ctx.state.engine, ctx.account_id, filters),
                             media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# -- image tasks ----------------------------------------------------------------------------------

@page()
async def tasks(ctx: Ctx) -> Response:
    status = ctx.request.query_params.get("status") or None
    status = status if status in TASK_STATUSES else None
    cursor = queries.decode_cursor(ctx.request.query_params.get("before"))
    async with ctx.state.engine.connect() as conn:
        rows, next_cursor = await conn.run_sync(queries.tasks_page, ctx.account_id, status, cursor)
    query = {"status": status} if status else {}
    return ctx.render("tasks.html", tasks=rows, current=status or "", statuses=TASK_STATUSES, paged=cursor is not None,
                      next_url=f"?{urlencode({**query, 'before': next_cursor})}" if next_cursor else None)


@page()
async def task(ctx: Ctx) -> Response:
    task_id = ctx.request.path_params["task_id"]
    async with ctx.state.engine.connect() as conn:
        row = await conn.run_sync(queries.task_detail, ctx.account_id, task_id)
    if row is None:  # another account's task looks exactly like a missing one
        return error_page(ctx, 404, "No such task", "There is no task with that id in your account.")
    images = [{"url": url, "path": thumbs.local_path(url)} for url in row["result_urls"] or []]
    return ctx.render("task.html", task=row, images=images, deliveries=row["deliveries"])


@page()
async def thumbnail(ctx: Ctx) -> Response:
    task_id, index = ctx.request.path_params["task_id"], params.position(ctx.request.path_params["index"])
    url = None
    if index is not None and params.is_id(task_id):
        async with ctx.state.engine.connect() as conn:
            url = await conn.run_sync(queries.task_image_url, ctx.account_id, task_id, index)
    key = thumbs.storage_key(url) if url else None
    if key is None:
        return Response(status_code=404)
    try:
        path = await run_in_threadpool(thumbs.thumbnail, ctx.state.storage, ctx.state.settings.data_dir / "thumbs", key)
    except (OSError, ValueError):
        return Response(status_code=404)
    # Images never change once a task completes; the session cookie guards who may see them.
    return FileResponse(path, media_type="image/webp", headers={"Cache-Control": "private, max-age=604800"})


# -- models, webhooks, admin ----------------------------------------------------------------------

@page()
async def models(ctx: Ctx) -> Response:
    settings = ctx.state.settings
    return ctx.render("models.html", models=pricing.models(ctx.state.catalog),
                      base_urls=pricing.base_urls(settings.public_url), public_url=settings.public_url)


async def _webhooks_page(ctx: Ctx, secret: dict | None = None, rotated: bool = False) -> Response:
    async with ctx.state.engine.connect() as conn:
        deliveries = await conn.run_sync(queries.recent_deliveries, ctx.account_id)
    return ctx.render("webhooks.html", secret=secret, rotated=rotated, deliveries=deliveries,
                      grace_hours=ctx.state.settings.webhook_secret_grace // 3600)


@page()
async def webhooks_page(ctx: Ctx) -> Response:
    return await _webhooks_page(ctx)


@page()
async def reveal_secret(ctx: Ctx) -> Response:
    # A POST (with its CSRF token) rather than a GET: the secret appears only on a deliberate click.
    secret = await run(ctx.state.engine, webhooks.secret_info, ctx.account_id)
    return await _webhooks_page(ctx, secret)


@page()
async def rotate_secret(ctx: Ctx) -> Response:
    secret = await run(ctx.state.engine, webhooks.rotate, ctx.account_id, ctx.state.settings.webhook_secret_grace)
    return await _webhooks_page(ctx, secret, rotated=True)


async def _admin_page(ctx: Ctx, error: str | None = None, status: int = 200) -> Response:
    search = (ctx.request.query_params.get("q") or "").strip()[:320]
    async with ctx.state.engine.connect() as conn:
        rows = await conn.run_sync(queries.list_accounts, search)
    return ctx.render("admin.html", status=status, accounts=rows, search=search, error=error, message=_message(ctx))


@page(admin=True)
async def admin(ctx: Ctx) -> Response:
    return await _admin_page(ctx)


@page(admin=True)
async def admin_topup(ctx: Ctx) -> Response:
    account_id = params.row_id(ctx.form.get("account_id"))
    if account_id is None:
        return await _admin_page(ctx, "No such account.", 404)
    try:
        amount = money.from_usd(ctx.form.get("amount", "").strip().lstrip("$"))
        if amount <= 0 or amount > money.from_usd("1000000"):
            raise ValueError("out of range")
    except (TypeError, ValueError):
        return await _admin_page(ctx, "Enter a positive USD amount (at most 1,000,000), e.g. 10 or 2.50.", 400)
    note = ctx.form.get("note", "").strip()[:400] or "top-up"
    note = f"{note} (by {ctx.current_account['email']})"
    if not await run(ctx.state.engine, queries.top_up, account_id, amount, note):
        return await _admin_page(ctx, "No such account.", 404)
    return _see("/dashboard/admin", "topup")


async def to_dashboard(request: Request) -> Response:
    return RedirectResponse("/dashboard/", status_code=307)


routes = [
    Route("/", overview, methods=["GET"]),
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/logout/everywhere", logout_everywhere, methods=["POST"]),
    Route("/keys", keys_page, methods=["GET"]),
    Route("/keys", create_key, methods=["POST"]),
    Route("/keys/{key_id}/revoke", revoke_key, methods=["POST"]),
    Route("/usage", usage, methods=["GET"]),
    Route("/usage.csv", usage_csv, methods=["GET"]),
    Route("/tasks", tasks, methods=["GET"]),
    Route("/tasks/{task_id}", task, methods=["GET"]),
    Route("/tasks/{task_id}/thumb/{index}.webp", thumbnail, methods=["GET"]),
    Route("/models", models, methods=["GET"]),
    Route("/webhooks", webhooks_page, methods=["GET"]),
    Route("/webhooks/secret", reveal_secret, methods=["POST"]),
    Route("/webhooks/rotate", rotate_secret, methods=["POST"]),
    Route("/admin", admin, methods=["GET"]),
    Route("/admin/topup", admin_topup, methods=["POST"]),
    Mount("/static", app=StaticFiles(directory=str(STATIC)), name="dashboard-static"),
]
