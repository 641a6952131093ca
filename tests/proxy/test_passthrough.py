"""Golden bytes and headers: what the client gets is what the upstream sent, and the other way round."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import httpx
import pytest

from tests.proxy.conftest import money_state, usage_rows


def tag() -> str:
    return secrets.token_hex(6)


def stream_bytes(url: str, headers: dict, body) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", url, headers=headers, content=body if isinstance(body, bytes) else json.dumps(body),
                      timeout=20) as response:
        return response, response.read()


def chat(text: str, **extra) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **extra}


GOLDEN = {
    "chat": ("/v1/chat/completions", lambda t: chat(t, stream=True, stream_options={"include_usage": True})),
    "responses": ("/v1/responses", lambda t: {"model": "gpt-5.4", "input": t, "stream": True}),
    "messages": ("/anthropic/v1/messages",
                 lambda t: {"model": "claude-sonnet-4-6", "max_tokens": 100, "stream": True,
                            "messages": [{"role": "user", "content": t}]}),
    "gemini-sse": ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                   lambda t: {"contents": [{"parts": [{"text": t}]}]}),
    # The hosted docs' curl: no ?alt=sse, so Gemini streams a JSON array.
    "gemini-array": ("/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                     lambda t: {"contents": [{"parts": [{"text": t}]}]}),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_streamed_bytes_are_the_upstreams(name, base, account, llm_upstream):
    path, make = GOLDEN[name]
    name_tag = tag()
    response, received = stream_bytes(base + path, account.headers, make(f"hi [chunks:5] [tag:{name_tag}]"))
    assert response.status_code == 200
    assert received == llm_upstream.sent[name_tag]
    assert len(received) > 500


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", chat("hi")),
    ("/v1/responses", {"model": "gpt-5.4", "input": "hi"}),
    ("/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/models/gemini-2.5-flash:generateContent", {"contents": [{"parts": [{"text": "hi"}]}]}),
])
def test_whole_bodies_are_the_upstreams(path, body, base, account, llm_upstream):
    name_tag = tag()
    text = json.dumps(body).replace('"hi"', f'"hi [tag:{name_tag}]"')
    response = httpx.post(base + path, headers=account.headers, content=text)
    assert response.status_code == 200
    assert response.content == llm_upstream.sent[name_tag]
    assert response.headers["content-length"] == str(len(response.content))


def test_include_usage_is_added_upstream_and_its_chunk_hidden(base, account, llm_upstream):
    name_tag = tag()
    body = b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi [tag:%s]"}]}' % (
        name_tag.encode())
    _, received = stream_bytes(base + "/v1/chat/completions", account.headers, body)
    sent_up = llm_upstream.last("/chat/completions")["body"]
    assert sent_up == b'{"stream_options":{"include_usage":true},' + body[1:]
    upstream_sent = llm_upstream.sent[name_tag]
    events = upstream_sent.split(b"\n\n")
    usage_event = next(e for e in events if b'"choices":[]' in e)
    assert received == upstream_sent.replace(usage_event + b"\n\n", b"")
    assert received.endswith(b"data: [DONE]\n\n") and b'"prompt_tokens"' not in received


def test_request_body_goes_up_unchanged_but_for_the_model(base, account, llm_upstream):
    body = (b'{"model" :  "qwen-max",\n '
            b'"messages": [{"role": "user", "content": "caf\xc3\xa9 \\u00e9 [out:3]"}], "n": 1}')
    response = httpx.post(base + "/v1/chat/completions", headers=account.headers, content=body)
    assert response.status_code == 200
    assert llm_upstream.last("/chat/completions")["body"] == body.replace(b'"qwen-max"', b'"qwen-max-2025-01-25"')
    plain = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.5}'
    httpx.post(base + "/v1/chat/completions", headers=account.headers, content=plain)
    assert llm_upstream.last("/chat/completions")["body"] == plain


def test_bodies_only_pythons_json_reads_still_go_up(base, account, llm_upstream):
    """The fast parser refuses NaN and lone surrogate escapes; such bodies are read as before, not refused."""
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\ud800 odd"}],"temperature":NaN}'
    response = httpx.post(base + "/v1/chat/completions", headers=account.headers, content=body)
    assert response.status_code == 200
    assert llm_upstream.last("/chat/completions")["body"] == body


def test_credentials_and_headers_upstream(base, account, llm_upstream):
    headers = {**account.headers, "x-api-key": account.key, "openai-organization": "org-client",
               "proxy-authorization": "Basic eA==", "te": "trailers", "x-stainless-lang": "python",
               "cookie": "session=1"}
    httpx.post(base + "/v1/chat/completions", headers=headers, json=chat("hi"))
    sent = llm_upstream.last("/chat/completions")
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-llm-openai"
    assert sent["headers"]["x-stainless-lang"] == "python"
    for gone in ("x-api-key", "openai-organization", "proxy-authorization", "te", "cookie"):
        assert gone not in sent["headers"]
    assert account.key not in json.dumps(sent["headers"])


def test_gemini_key_in_the_query_is_used_and_not_forwarded(base, account, llm_upstream):
    response = httpx.post(base + f"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={account.key}",
                          json={"contents": [{"parts": [{"text": "hi"}]}]})
    assert response.status_code == 200
    sent = llm_upstream.last(":streamGenerateContent")
    assert sent["query"] == "alt=sse" and account.key not in json.dumps(sent["headers"])
    assert sent["headers"]["x-goog-api-key"] == "upstream-gemini-llm-key"


def test_response_headers_kept_and_dropped(base, account):
    response = httpx.post(base + "/v1/chat/completions", headers=account.headers, json=chat("hi"))
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "req_fake_openai"
    assert response.headers["x-ratelimit-remaining-requests"] == "9999"
    assert response.headers["x-mediagate-request-id"].startswith("req_")
    assert "openai-organization" not in response.headers and "set-cookie" not in response.headers
    anthropic = httpx.post(base + "/anthropic/v1/messages", headers={"x-api-key": account.key},
                           json={"model": "claude-sonnet-4-6", "max_tokens": 5,
                                 "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic.headers["request-id"] == "req_fake_anthropic"
    assert anthropic.headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert "anthropic-organization-id" not in anthropic.headers


def test_the_shared_upstream_pool_keeps_no_cookies(llm_upstream):
    """One account's upstream cookie (the fake sets one) must never go out with another's call."""
    from app.proxy.client import Pool
    from tests.conftest import LLM_PORT

    # By name, not by IP: a cookie jar ignores cookies from IP addresses anyway.
    base_url = f"http://localhost:{LLM_PORT}/v1"

    async def two_calls():
        pool = Pool(base_url, connect_timeout=5, read_timeout=5)
        for text in ("one", "two"):
            response = await pool.post(base_url + "/chat/completions", {"content-type": "application/json"},
                                       json.dumps(chat(text)).encode())
            assert response.header(b"set-cookie").startswith(b"__cf_bm=")
            await response.read()
            response.release()
        pool.close()

    asyncio.run(two_calls())
    assert "cookie" not in llm_upstream.last("/chat/completions")["headers"]


def test_stream_is_not_buffered(base, account):
    started = time.perf_counter()
    with httpx.stream("POST", base + "/v1/chat/completions", headers=account.headers,
                      json=chat("hi [chunks:4] [slow:150]", stream=True), timeout=20) as response:
        arrivals = [time.perf_counter() - started for _ in response.iter_raw()]
    # The upstream sends the role chunk at once, then waits 150 ms before each of 4 deltas:
    # a gateway that held the stream back would deliver it all at once, at the end.
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] >= 0.55


def test_upstream_errors_pass_through_untouched_and_cost_nothing(base, make_account, engine, llm_upstream):
    account = make_account()
    name_tag = tag()
    for path, body in (("/v1/chat/completions", chat(f"hi [status:429] [tag:{name_tag}]", stream=True)),
                       ("/anthropic/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 5, "stream": True,
                                                   "messages": [{"role": "user", "content": "x [status:529]"}]})):
        response = httpx.post(base + path, headers=account.headers, content=json.dumps(body))
        assert response.status_code in (429, 529)
    assert response.json() == {"type": "error", "error": {"type": "overloaded_error",
                                                          "message": "fake upstream error"}}
    records = usage_rows(engine, account.id, 2)
    assert sorted(r.upstream_status for r in records) == [429, 529]
    assert all(r.cost == 0 and not r.usage_reported for r in records)
    balance, _, ledger_sum = money_state(engine, account.id)
    assert balance == ledger_sum == 10 * 10**9



def test_calls_in_a_row_share_one_upstream_connection(base, account, llm_upstream):
    """The gateway hands each answered connection back to its pool, whole answers and streams
    alike; calls one after another then reach the upstream on the same connection."""
    marker = tag()
    for n in range(6):
        body = chat(f"call {n} {marker}", stream=n % 2 == 1)
        response = httpx.post(base + "/v1/chat/completions", headers=account.headers, json=body, timeout=20)
        assert response.status_code == 200
    clients = {call["client"] for call in llm_upstream.calls if marker.encode() in call["body"]}
    assert len(clients) == 1
