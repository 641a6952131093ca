"""Account routes: balance."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.core import ledger, money
from app.core.auth import require
from app.core.services import services


async def get_balance(request: Request) -> JSONResponse:
    principal = await require(request)
    async with services(request).engine.connect() as conn:
        units = await conn.run_sync(ledger.balance, principal.account_id)
    return JSONResponse({"balance": money.render(units), "currency": "USD"})


routes = [Route("/v1/balance", get_balance, methods=["GET"])]
