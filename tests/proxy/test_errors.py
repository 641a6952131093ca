"""Every error the gateway makes is in the route's own format, so each SDK raises its proper exception."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.proxy.conftest import money_state, usage_rows

MESSAGES = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
GEMINI = {"contents": [{"parts": [{"text": "hi"}]}]}


def assert_openai_error(response, status, code=None):
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code


def assert_anthropic_error(response, status, kind):
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]


def assert_gemini_error(response, status, name):
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["status"] == name and error["message"]


def test_no_key_401_per_family(base):
    assert_openai_error(httpx.post(base + "/v1/chat/completions", json={"model": "gpt-4o", **CHAT}), 401)
    assert_openai_error(httpx.post(base + "/api.openai.com/v1/responses", json={"model": "gpt-5.4"}), 401)
    assert_anthropic_error(httpx.post(base + "/anthropic/v1/messages", json=MESSAGES), 401, "authentication_error")
    assert_anthropic_error(httpx.post(base + "/v1/messages", headers={"x-api-key": "sk-nope"}, json=MESSAGES),
                           401, "authentication_error")
    assert_gemini_error(httpx.post(base + "/v1beta/models/gemini-2.5-flash:generateContent", json=GEMINI), 401,
                        "UNAUTHENTICATED")
    assert_anthropic_error(httpx.get(base + "/anthropic/v1/models"), 401, "authentication_error")


def test_unknown_model_404_per_family(base, account):
    h = account.headers
    r = httpx.post(base + "/v1/chat/completions", headers=h, json={"model": "gpt-9", **CHAT})
    assert_openai_error(r, 404, "model_not_found")
    assert r.json()["error"]["param"] == "model"
    # Offered, but on another route: not found on this one.
    assert_openai_error(httpx.post(base + "/v1/responses", headers=h, json={"model": "gpt-4o", "input": "x"}), 404)
    assert_anthropic_error(httpx.post(base + "/anthropic/v1/messages", headers=h,
                                      json={"model": "gpt-4o", **MESSAGES}), 404, "not_found_error")
    assert_gemini_error(httpx.post(base + "/v1beta/models/gemini-9:streamGenerateContent", headers=h, json=GEMINI),
                        404, "NOT_FOUND")


def test_sdks_raise_their_not_found_errors(base, account):
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(api_key=account.key, base_url=base + "/v1").chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(api_key=account.key, base_url=base + "/anthropic").messages.create(
            model="claude-9", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    client = genai.Client(api_key=account.key, http_options=types.HttpOptions(base_url=base + "/"))
    with pytest.raises(genai_errors.ClientError) as raised:
        client.models.generate_content(model="gemini-9", contents="hi")
    assert raised.value.code == 404


def test_a_request_the_provider_refuses_raises_the_sdks_bad_request_and_costs_nothing(base, make_account, engine):
    # The gateway checks only what it needs (model, max_tokens); the provider checks the rest,
    # and its 400 reaches the SDK as it was sent.
    account = make_account()
    with pytest.raises(openai.BadRequestError) as raised:
        openai.OpenAI(api_key=account.key, base_url=base + "/v1").chat.completions.create(
            model="gpt-4o", messages=None)  # sent as null
    assert raised.value.body["message"] == "messages: Field required"
    response = httpx.post(base + "/anthropic/v1/messages", headers=account.headers,
                          json={"model": "claude-sonnet-4-6", "max_tokens": 5})
    assert_anthropic_error(response, 400, "invalid_request_error")
    assert response.json()["error"]["message"] == "messages: Field required"
    # (Google's SDK refuses empty contents itself, before sending.)
    response = httpx.post(base + "/v1beta/models/gemini-2.5-flash:generateContent", headers=account.headers,
                          json={"generationConfig": {"maxOutputTokens": 5}})
    assert_gemini_error(response, 400, "INVALID_ARGUMENT")
    assert response.json()["error"]["message"] == "contents: Field required"
    records = usage_rows(engine, account.id, 3)
    assert [r.upstream_status for r in records] == [400, 400, 400]
    assert all(r.cost == 0 and not r.usage_reported for r in records)
    balance, _, ledger_sum = money_state(engine, account.id)  # (the pool's idle hold goes back later)
    assert balance == ledger_sum == 10 * 10**9


def test_balance_too_low_402_per_family_and_nothing_held(base, make_account, engine):
    poor = make_account(balance="0.00001")
    h = poor.headers
    # max_tokens 1000 of gpt-4o output alone can cost $0.01.
    assert_openai_error(httpx.post(base + "/v1/chat/completions", headers=h,
                                   json={"model": "gpt-4o", "max_tokens": 1000, **CHAT}), 402, "insufficient_balance")
    assert_anthropic_error(httpx.post(base + "/anthropic/v1/messages", headers=h,
                                      json={"model": "claude-sonnet-4-6", **MESSAGES, "max_tokens": 1000}),
                           402, "billing_error")
    assert_gemini_error(httpx.post(base + "/v1beta/models/gemini-2.5-flash:generateContent", headers=h,
                                   json={**GEMINI, "generationConfig": {"maxOutputTokens": 1000}}),
                        402, "FAILED_PRECONDITION")
    with pytest.raises(openai.APIStatusError) as raised:
        openai.OpenAI(api_key=poor.key, base_url=base + "/v1").chat.completions.create(
            model="gpt-4o", max_completion_tokens=1000, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 402
    assert money_state(engine, poor.id) == (10_000, 0, 10_000)


def test_bad_requests_400(base, account):
    h = account.headers
    assert_anthropic_error(httpx.post(base + "/anthropic/v1/messages", headers=h,
                                      json={"model": "claude-sonnet-4-6", "messages": []}),
                           400, "invalid_request_error")
    assert_openai_error(httpx.post(base + "/v1/chat/completions", headers=h, content=b"{not json"), 400,
                        "invalid_json")
    assert_openai_error(httpx.post(base + "/v1/chat/completions", headers=h, json=CHAT), 400, "missing_model")
    assert_gemini_error(httpx.post(base + "/v1beta/models/gemini-2.5-flash:embedContent", headers=h, json=GEMINI),
                        404, "NOT_FOUND")


def test_unreachable_upstream_502_costs_nothing(base, make_account, engine):
    account = make_account()
    response = httpx.post(base + "/v1/chat/completions", headers=account.headers,
                          json={"model": "down-chat", "stream": True, **CHAT})
    assert_openai_error(response, 502, "upstream_error")
    record = usage_rows(engine, account.id)[0]
    assert record.upstream_status is None and record.cost == 0 and not record.usage_reported
    assert money_state(engine, account.id)[0] == 10 * 10**9


def test_front_door_and_router_agree(base, gateway, account):
    """Passthrough POSTs skip the router; other methods on those paths still get the router's answers."""
    assert_openai_error(httpx.get(base + "/v1/chat/completions", headers=account.headers), 405)
    assert_anthropic_error(httpx.get(gateway.url + "/anthropic/v1/messages", headers=account.headers), 405,
                           "api_error")
    # Without the /llm-api prefix the front door serves the same endpoints.
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=account.headers,
                          json={"model": "gpt-4o", **CHAT})
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"
    assert_gemini_error(httpx.post(gateway.url + "/v1/models/gemini-2.5-flash:countTokens", headers=account.headers,
                                   json=GEMINI), 404, "NOT_FOUND")


def test_unexpected_failure_is_500_in_the_family_shape(base, account, monkeypatch):
    from app.proxy import calls

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(calls, "prepare", broken)
    assert_openai_error(httpx.post(base + "/v1/chat/completions", headers=account.headers, json=CHAT), 500,
                        "internal_error")
    assert_anthropic_error(httpx.post(base + "/anthropic/v1/messages", headers=account.headers, json=MESSAGES),
                           500, "api_error")
    assert_gemini_error(httpx.post(base + "/v1beta/models/gemini-2.5-flash:generateContent",
                                   headers=account.headers, json=GEMINI), 500, "INTERNAL")


def test_an_upstream_silent_past_its_timeout_is_504_and_costs_nothing(base, make_account, engine, llm_upstream):
    """`slow-chat`'s provider has `timeout = 0.5`: an upstream that says nothing for longer is given up."""
    account = make_account()
    name = f"silent-{account.id}"
    response = httpx.post(base + "/v1/chat/completions", headers=account.headers, timeout=10,
                          json={"model": "slow-chat",
                                "messages": [{"role": "user", "content": f"hi [wait:3000] [tag:{name}]"}]})
    assert_openai_error(response, 504, "upstream_timeout")
    assert llm_upstream.closed[name].wait(5)  # and the upstream request was closed
    record = usage_rows(engine, account.id)[0]
    assert record.upstream_status is None and record.cost == 0 and not record.usage_reported
    balance, _, ledger = money_state(engine, account.id)
    assert balance == ledger == 10 * 10**9


def test_silence_mid_stream_ends_the_stream_and_charges_what_was_reported(base, make_account, engine,
                                                                         llm_upstream):
    account = make_account()
    name = f"stalled-{account.id}"
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):  # the client sees the stream break off
        with httpx.stream("POST", base + "/anthropic/v1/messages", headers=account.headers, timeout=10,
                          json={"model": "slow-claude", "max_tokens": 50, "stream": True, "messages": [
                              {"role": "user", "content": f"x [in:40] [hang:2] [tag:{name}]"}]}) as response:
            for chunk in response.iter_raw():
                got += chunk
    assert got.count(b"event: content_block_delta") == 2  # what came before the silence came through
    assert llm_upstream.closed[name].wait(5)
    record = usage_rows(engine, account.id)[0]
    # message_start reported 40 input tokens and 1 output token, and nothing came after it: the
    # output is estimated from the 14 bytes of text streamed ("Hello from the"), 4 tokens.
    assert (record.upstream_status, record.usage_reported, record.client_disconnected) == (200, True, False)
    assert record.usage_estimated and (record.input_tokens, record.output_tokens) == (40, 4)
    assert record.cost == 44 * 1000  # $1 per 1M tokens: 1,000 nano-dollars a token
    balance, _, ledger = money_state(engine, account.id)
    assert balance == ledger == 10 * 10**9 - 44_000
