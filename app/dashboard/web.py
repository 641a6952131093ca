"""Request plumbing for dashboard pages: the session, CSRF on every form, security headers."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from app.core import params
from app.core.models import utcnow
from app.core.services import Services, services
from app.dashboard import queries, render, sessions

MAX_FORM_BYTES = 64 * 1024
PAGE_HEADERS = {
    # Everything is served from here: no inline script, no third-party origin, no framing.
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
                                "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class FormError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Ctx:
    """One dashboard request: its session, the signed-in account (if any), its form and the browser's zone."""

    request: Request
    session: sessions.Session
    tz: ZoneInfo
    account: dict | None = None
    form: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> Services:
        return services(self.request)

    @property
    def current_account(self) -> dict:
        """The signed-in account, on a page that requires one (page() has let only such requests in)."""
        assert self.account is not None
        return self.account

    @property
    def account_id(self) -> int:
        return self.current_account["id"]

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = render.page(template, account=self.account, csrf=self.session.csrf, tz=self.tz, tz_name=self.tz.key,
                           path=self.request.url.path, **context)
        return HTMLResponse(html, status_code=status)


def _signer(request: Request) -> sessions.Signer:
    return services(request).signer


def limiter(request: Request) -> sessions.LoginLimiter:
    return services(request).limiter


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def save_session(request: Request, response: Response, session: sessions.Session) -> None:
    settings = services(request).settings
    secure = request.url.scheme == "https" or settings.public_url.startswith("https://")
    response.set_cookie(sessions.COOKIE, _signer(request).dumps(session), max_age=sessions.MAX_AGE,
                        path=sessions.COOKIE_PATH, httponly=True, samesite="lax", secure=secure)


async def read_form(request: Request) -> dict[str, str]:
    length = params.content_length(request.headers.get("content-length"))
    if length is not None and length > MAX_FORM_BYTES:
        raise FormError(413, "That form is too large.")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type:
        return {}  # no form at all: refused by the CSRF check, like any form without its token
    if content_type != "application/x-www-form-urlencoded":
        raise FormError(415, "Forms are sent as application/x-www-form-urlencoded.")
    async with request.form(max_files=0, max_fields=50) as form:
        return {key: value for key, value in form.items() if isinstance(value, str)}


async def _signed_in(request: Request, session: sessions.Session) -> dict | None:
    """The account of the session's row, or None (not signed in; or signed out, revoked, expired)."""
    if session.token is None:
        return None
    async with services(request).engine.connect() as conn:
        return await conn.run_sync(queries.session_account, session.token, utcnow())


def error_page(ctx: Ctx, status: int, title: str, message: str) -> HTMLResponse:
    return ctx.render("error.html", status=status, title=title, message=message)


Handler = Callable[[Ctx], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def page(*, signed_in: bool = True, admin: bool = False) -> Callable[[Handler], Endpoint]:
    """Wrap a handler: load the session, check the CSRF token of every POST, require a signed-in
    account (and the admin flag), then add the security headers and the session cookie."""

    def wrap(handler: Handler) -> Endpoint:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            cookie_session = _signer(request).loads(request.cookies.get(sessions.COOKIE))
            session = cookie_session or sessions.Session(changed=True)
            ctx = Ctx(request, session, render.zone(request.cookies.get(render.TZ_COOKIE)))
            ctx.account = await _signed_in(request, session)
            if session.token is not None and ctx.account is None:  # its row has ended: forget the token
                session.token, session.changed = None, True
            response = await _guarded(ctx, handler, signed_in, admin)
            for name, value in PAGE_HEADERS.items():
                response.headers.setdefault(name, value)
            if ctx.session.changed:  # (signing in and out replace the session)
                save_session(request, response, ctx.session)
            return response

        return endpoint

    return wrap


def _clean(values: Iterable[object]) -> bool:
    return all(params.is_clean(str(value)) for value in values)


async def _guarded(ctx: Ctx, handler: Handler, signed_in: bool, admin: bool) -> Response:
    request = ctx.request
    if not (_clean(request.query_params.values()) and _clean(request.path_params.values())):
        return error_page(ctx, 400, "Bad address", "This address contains a character no page takes (NUL).")
    if request.method == "POST":
        try:
            ctx.form = await read_form(request)
        except FormError as exc:
            return error_page(ctx, exc.status, "Form refused", exc.message)
        if not _clean(ctx.form.values()):
            return error_page(ctx, 400, "Form refused", "A field of this form contains a character no field "
                                                        "takes (NUL).")
        if not sessions.csrf_ok(ctx.session, ctx.form.get("csrf")):
            return error_page(ctx, 403, "Form expired",
                              "This form did not carry a valid security token (it may be from an old page, or "
                              "from another site). Reload the page and try again.")
    if signed_in and ctx.account is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/dashboard/login?next={quote(target)}", status_code=303)
    if admin and not ctx.current_account["is_admin"]:
        return error_page(ctx, 403, "Admins only", "This page is for administrator accounts.")
    return await handler(ctx)


def safe_next(value: str | None) -> str:
    """Where to go after signing in: only a dashboard path on this site."""
    if value and value.startswith("/dashboard") and "//" not in value and "\\" not in value:
        return value
    return "/dashboard/"
