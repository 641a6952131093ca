"""Holds, disconnects, broken streams and concurrency: the balance pays for what the upstream reported, never more
than it has."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from decimal import Decimal
from urllib.parse import urlsplit

import httpx
import pytest

from app.core import money
from tests.proxy.conftest import money_state, usage_rows


def wait_until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def read_then_leave(url: str, headers: dict, body: dict, until: bytes) -> bytes:
    """Stream until `until` has arrived, then close the connection."""
    got = b""
    with httpx.stream("POST", url, headers=headers, json=body, timeout=20) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            got += chunk
            if until in got:
                break
    return got


def test_client_disconnect_mid_stream_charges_the_reported_input_and_an_estimate(base, make_account, engine,
                                                                                 llm_upstream):
    account = make_account()
    tag = secrets.token_hex(6)
    body = {"model": "claude-sonnet-4-6", "max_tokens": 500, "stream": True,
            "messages": [{"role": "user", "content": f"[in:1000] [out:400] [hang:1] [tag:{tag}]"}]}
    got = read_then_leave(base + "/anthropic/v1/messages", {"x-api-key": account.key}, body, b"text_delta")
    assert b"message_start" in got
    # The gateway read on for the usage (2 s here), then closed its upstream request.
    assert llm_upstream.closed[tag].wait(5)
    record = usage_rows(engine, account.id)[0]
    assert record.client_disconnected and record.usage_reported and record.upstream_status == 200
    # message_start reported 1000 input tokens; the output is estimated from the 5 bytes of
    # "Hello" streamed: 2 tokens (more than the 1 message_start counted). $3 and $15 per 1M.
    assert record.usage_estimated and (record.input_tokens, record.output_tokens) == (1000, 2)
    assert record.cost == money.from_usd(Decimal(1000 * 3 + 2 * 15) / 1_000_000)
    wait_until(lambda: money_state(engine, account.id) == (10**10 - record.cost, 0, 10**10 - record.cost))


def test_client_gone_before_the_upstream_answers(base, make_account, engine, llm_upstream):
    account = make_account()
    tag = secrets.token_hex(6)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", headers=account.headers, timeout=0.5,
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"[wait:10000] [tag:{tag}]"}]})
    assert llm_upstream.closed[tag].wait(5)
    record = usage_rows(engine, account.id)[0]
    assert record.client_disconnected and record.cost == 0 and record.upstream_status is None


def test_client_gone_at_once_still_closes_the_upstream_request(base, make_account, engine, llm_upstream):
    # The gateway starts watching a call's client only after WATCH_AFTER; one that left
    # before then must be noticed when it does, not when the upstream answers.
    account = make_account()
    tag = secrets.token_hex(6)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": f"[wait:10000] [tag:{tag}]"}]})
    host, port = urlsplit(base).hostname, urlsplit(base).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall((f"POST {urlsplit(base).path}/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                      f"Authorization: Bearer {account.key}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        assert llm_upstream.opened[tag].wait(5)  # the call reached the upstream...
    # ... and the client is gone: the upstream request is closed long before its 10 s answer.
    assert llm_upstream.closed[tag].wait(5)
    wait_until(lambda: usage_rows(engine, account.id))
    record = usage_rows(engine, account.id)[0]
    assert record.client_disconnected and record.cost == 0 and record.upstream_status is None


def test_upstream_breaking_mid_stream(base, make_account, engine):
    account = make_account()
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):  # the client sees the stream break too
        with httpx.stream("POST", base + "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                          headers=account.headers, timeout=20,
                          json={"contents": [{"parts": [{"text": "[in:100] [out:60] [chunks:3] [drop:2]"}]}]}) as r:
            for chunk in r.iter_raw():
                got += chunk
    assert got.count(b"data: ") == 2
    record = usage_rows(engine, account.id)[0]
    # The second chunk's running usage: 100 in, 40 out at $0.30 / $2.50 per 1M.
    assert (record.input_tokens, record.output_tokens) == (100, 40)
    assert record.cost == money.from_usd(Decimal(100 * Decimal("0.30") + 40 * Decimal("2.50")) / 1_000_000)
    assert not record.client_disconnected and record.upstream_status == 200 and record.usage_estimated


def test_fifty_concurrent_streams_never_overdraw(base, make_account, engine):
    account = make_account(balance="0.02")
    # Each call may cost about $0.0014 (its hold), but the upstream reports far more: 1000 in
    # and 1000 out, $0.0125. The holds let ~14 of the 50 through; what they cost is cut to the balance.
    body = json.dumps({"model": "gpt-4o", "max_tokens": 100, "stream": True, "messages": [
        {"role": "user", "content": "[in:1000] [out:1000] [chunks:3] [slow:50]"}]})

    async def one(client: httpx.AsyncClient) -> tuple[int, bytes]:
        async with client.stream("POST", base + "/v1/chat/completions", headers=account.headers,
                                 content=body) as response:
            return response.status_code, await response.aread()

    async def run_all():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(one(client) for _ in range(50)))

    results = asyncio.run(run_all())
    statuses = [status for status, _ in results]
    ok = statuses.count(200)
    assert statuses.count(402) == 50 - ok and 2 <= ok < 50
    assert all(content.endswith(b"data: [DONE]\n\n") for status, content in results if status == 200)
    rows = usage_rows(engine, account.id, ok)
    wait_until(lambda: money_state(engine, account.id)[1] == 0)
    balance, held, ledger_sum = money_state(engine, account.id)
    assert 0 <= balance == ledger_sum and held == 0
    assert sum(r.cost for r in rows) == money.from_usd("0.02") - balance
    assert balance < money.from_usd("0.0125")  # the money ran out: no further call could have been paid


def test_holds_are_released_and_costs_match_the_ledger(base, make_account, engine):
    account = make_account(balance="1")
    for _ in range(5):
        r = httpx.post(base + "/v1/chat/completions", headers=account.headers,
                       json={"model": "gpt-4o", "messages": [{"role": "user", "content": "[in:10] [out:10]"}]})
        assert r.status_code == 200
    rows = usage_rows(engine, account.id, 5)
    each = money.from_usd(Decimal(10 * Decimal("2.5") + 10 * 10) / 1_000_000)
    assert [r.cost for r in rows] == [each] * 5
    wait_until(lambda: money_state(engine, account.id) == (10**9 - 5 * each, 0, 10**9 - 5 * each))
