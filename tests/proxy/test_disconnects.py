"""A client that leaves mid-answer pays for what the provider generated, never $0 for content served.

The gateway reads the upstream on for MEDIAGATE_USAGE_DRAIN_SECONDS (2 s in the tests) after the
client leaves, for the provider's own usage; when that does not come, it charges an estimate from
what was streamed (`usage_estimated`). Before the upstream answers, leaving closes its request at
once and costs nothing (tests/proxy/test_billing.py).
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from app.core import money
from app.proxy.pricing import BYTES_PER_TOKEN
from tests.fakes.llm import TEXT
from tests.proxy.conftest import money_state, usage_rows
from tests.proxy.test_billing import read_then_leave, wait_until

GEMINI_SSE = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
# (path, body with {m} for the markers, the bytes after which the client leaves, $ per 1M in and out)
ROUTES = {
    "chat": ("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": [
        {"role": "user", "content": "{m}"}]}, b'"finish_reason":"stop"', ("2.50", "10.00")),
    "responses": ("/v1/responses", {"model": "gpt-5.4", "stream": True, "input": "{m}"},
                  b"response.output_text.done", ("1.25", "10.00")),
    "messages": ("/anthropic/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 500, "stream": True,
                                            "messages": [{"role": "user", "content": "{m}"}]},
                 b"content_block_stop", ("3.00", "15.00")),
    "gemini": (GEMINI_SSE, {"contents": [{"parts": [{"text": "{m}"}]}]}, b'"text":" from the"', ("0.30", "2.50")),
}
TEXT_BYTES = len(TEXT.encode())


def _body(route: str, markers: str) -> dict:
    import json

    return json.loads(json.dumps(ROUTES[route][1]).replace("{m}", markers))


def _cost(route: str, input_tokens: int, output_tokens: int) -> int:
    """Nano-dollars at the route's model's prices, rounded up once (as app.proxy.pricing.cost)."""
    price_in, price_out = (money.from_usd(p) for p in ROUTES[route][3])
    return -(-(input_tokens * price_in + output_tokens * price_out) // 1_000_000)


def _leave(base: str, account, route: str, markers: str, until: bytes | None = None) -> bytes:
    path, _, after, _ = ROUTES[route]
    return read_then_leave(base + path, account.headers, _body(route, markers), until or after)


@pytest.mark.parametrize("route", list(ROUTES))
def test_leaving_before_the_usage_event_is_charged_the_reported_usage(route, base, make_account, engine,
                                                                      llm_upstream):
    # The issue this fixes: a client that read the whole text and closed before the usage event paid $0.
    account = make_account()
    tag = secrets.token_hex(6)
    got = _leave(base, account, route, f"[in:1000] [out:300] [tail:800] [tag:{tag}]")
    assert ROUTES[route][2] in got
    record = usage_rows(engine, account.id)[0]
    assert record.client_disconnected and record.upstream_status == 200
    assert record.usage_reported and not record.usage_estimated
    assert (record.input_tokens, record.output_tokens) == (1000, 300)
    assert record.cost == _cost(route, 1000, 300) > 0
    wait_until(lambda: money_state(engine, account.id) == (10**10 - record.cost, 0, 10**10 - record.cost))


@pytest.mark.parametrize("route", list(ROUTES))
def test_usage_that_never_comes_is_estimated_from_what_was_streamed(route, base, make_account, engine, llm_upstream):
    account = make_account()
    tag = secrets.token_hex(6)
    # Gemini: two of its three chunks (each with running usage), then silence; the others: all the
    # text, then silence where the usage should be.
    hang = 2 if route == "gemini" else 3
    started = time.monotonic()
    _leave(base, account, route, f"[in:1000] [out:60] [hang:{hang}] [tag:{tag}]",
           until=None if route == "gemini" else b" fake upstream.")
    # Read on for the drain time (2 s here), then the upstream request is closed.
    assert llm_upstream.closed[tag].wait(10)
    assert 1.8 < time.monotonic() - started < 9
    record = usage_rows(engine, account.id)[0]
    assert record.client_disconnected and record.usage_estimated and record.upstream_status == 200
    sent = next(call["body"] for call in llm_upstream.calls if f"[tag:{tag}]".encode() in call["body"])
    if route == "gemini":  # the second chunk's running count, above the 4 tokens of "Hello from the"
        expected = (1000, 40)
    elif route == "messages":  # message_start's input; the output estimated from the text
        expected = (1000, -(-TEXT_BYTES // BYTES_PER_TOKEN))
    else:  # nothing reported: the input as the hold estimated it (a token per byte of body)
        expected = (len(sent), -(-TEXT_BYTES // BYTES_PER_TOKEN))
    assert (record.input_tokens, record.output_tokens) == expected
    assert record.cost == _cost(route, *expected) > 0
    wait_until(lambda: money_state(engine, account.id) == (10**10 - record.cost, 0, 10**10 - record.cost))


def test_an_upstream_that_never_reports_usage_is_charged_an_estimate(base, make_account, engine, llm_upstream):
    account = make_account()
    for stream in (False, True):
        response = httpx.post(base + "/v1/chat/completions", headers=account.headers, timeout=20, json={
            "model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "[nousage]"}]})
        assert response.status_code == 200 and TEXT.split()[0] in response.text
    records = usage_rows(engine, account.id, count=2)
    for record in records:
        assert not record.usage_reported and record.usage_estimated and not record.client_disconnected
        assert record.output_tokens == -(-TEXT_BYTES // BYTES_PER_TOKEN) and record.input_tokens > 0
        assert record.cost > 0


def test_an_event_stream_is_metered_as_a_stream_whatever_the_request_said(base, make_account, engine):
    # An upstream that streams though the request did not ask: metered as the stream it is.
    account = make_account()
    response = httpx.post(base + "/v1/responses", headers=account.headers, timeout=20,
                          json={"model": "gpt-5.4", "input": "[in:50] [out:20] [sse]"})
    assert response.status_code == 200 and "response.completed" in response.text
    record = usage_rows(engine, account.id)[0]
    assert record.stream and record.usage_reported and not record.usage_estimated
    assert (record.input_tokens, record.output_tokens) == (50, 20)
    assert record.cost == _cost("responses", 50, 20)


NOT_BOOLEAN = ["true", 1, "yes", 0, [], {}]


@pytest.mark.parametrize("value", NOT_BOOLEAN)
@pytest.mark.parametrize("route", ["chat", "responses", "messages"])
def test_a_stream_flag_that_is_not_a_boolean_is_refused(route, value, base, make_account, engine, llm_upstream):
    account = make_account()
    body = {**_body(route, "[tag:never]"), "stream": value}
    before = len(llm_upstream.calls)
    response = httpx.post(base + ROUTES[route][0], headers=account.headers, json=body, timeout=20)
    assert response.status_code == 400
    error = response.json()
    if route == "messages":
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert "stream" in error["error"]["message"]
    else:
        assert error["error"]["param"] == "stream" and error["error"]["code"] == "invalid_type"
    assert len(llm_upstream.calls) == before  # nothing went upstream
    assert money_state(engine, account.id) == (10**10, 0, 10**10)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "stream": True, "stream_options": "x"},
     "stream_options"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "stream": True,
                              "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "max_tokens": "100"}, "max_tokens"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "max_completion_tokens": 2.5},
     "max_completion_tokens"),
    ("/v1/responses", {"model": "gpt-5.4", "input": "hi", "max_output_tokens": True}, "max_output_tokens"),
    ("/v1/chat/completions", {"model": "gpt-4o\x00", "messages": []}, "model"),
])
def test_fields_the_gateway_reads_must_have_their_documented_type(path, body, param, base, account):
    response = httpx.post(base + path, headers=account.headers, json=body, timeout=20)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("config", [{"maxOutputTokens": "5"}, {"maxOutputTokens": -1}, "fast"])
def test_gemini_generation_config_is_checked(config, base, account):
    response = httpx.post(base + "/v1beta/models/gemini-2.5-flash:generateContent", headers=account.headers,
                          timeout=20, json={"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": config})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and "generationConfig" in error["message"]


def test_an_answer_begun_without_text_is_charged_its_input(base, make_account, engine, llm_upstream):
    # A model that thinks before its first token: the head and the role chunk came, then nothing.
    # The provider bills the input of a call it answered, so the gateway charges the hold's estimate.
    account = make_account()
    tag = secrets.token_hex(6)
    _leave(base, account, "chat", f"[hang:0] [tag:{tag}]", until=b'"role":"assistant"')
    assert llm_upstream.closed[tag].wait(10)
    record = usage_rows(engine, account.id)[0]
    sent = next(call["body"] for call in llm_upstream.calls if f"[tag:{tag}]".encode() in call["body"])
    assert record.usage_estimated and not record.usage_reported
    assert (record.input_tokens, record.output_tokens) == (len(sent), 0)
    assert record.cost == _cost("chat", len(sent), 0) > 0
