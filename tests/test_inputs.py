"""No input a client controls gets a 5xx: generated values for every parameter of every route.

Each property throws values at one route's parameters (query, path, headers, JSON body,
form fields) and asserts the answer is below 500 and, for a 4xx, in the route's own error
shape. The values mix random text with the classes that once answered 500: digits that
`str.isdigit()` accepts but `int()` does not, numbers of thousands of digits, NUL bytes,
unpaired surrogates, deep nesting, malformed URLs, dates at the calendar's edges.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

TRICKY = ["", "0", "1", "-1", "²", "١٢", "⁵", "9" * 25, "9" * 5000, "1e3", "0x10", " 5", "\x00", "a\x00b",
          "%00", "9999-12-31", "0001-01-01", "2025-13-45", "2025-01-01T25:00", "9999-12-31T23:59:59-14:00",
          "0001-01-01T00:00:00+14:00", "null", "[]", "ÿ", "💥", "media_" + "0" * 24, "llm_x", "../../etc/passwd"]
# What a URL can carry (no surrogates: they can't be encoded as UTF-8 at all).
url_text = st.one_of(st.sampled_from(TRICKY), st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
                     st.integers(min_value=-10**30, max_value=10**30).map(str))
# Cursors that decode: times at the calendar's edges, in any zone, with ids that are and aren't ids.
cursors = st.builds(
    lambda moment, row_id: base64.urlsafe_b64encode(f"{moment.isoformat()}|{row_id}".encode()).decode().rstrip("="),
    st.one_of(st.datetimes(timezones=st.timezones()), st.datetimes(),
              st.sampled_from([datetime.min.replace(tzinfo=timezone(timedelta(hours=14))),
                               datetime.max.replace(tzinfo=timezone(timedelta(hours=-14)))])),
    st.one_of(st.sampled_from(["media_x", "req_1", "", "\x00", "a|b", "x" * 100]), st.text(max_size=10)))
cursor_text = st.one_of(url_text, cursors)
EDGE_CURSOR = base64.urlsafe_b64encode(b"0001-01-01T00:00:00+14:00|media_x").decode()
BAD_TEXT = ["\ud800", "a\ud83dz", "x\x00y", "\udfff\ud800"]
json_text = st.one_of(st.sampled_from(BAD_TEXT + TRICKY), st.text(max_size=20))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**40, max_value=10**40),
              st.floats(allow_nan=False, allow_infinity=False), json_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_text, inner, max_size=3), max_leaves=6)
URLS = ["https://example.com:99999/", "https://example.com:abc/", "https://[::1/", "http://", "https://",
        "https://ex ample.com/", "https://example.com/\x00", "data:image/png;base64,AAAA", "data:,x",
        "ftp://example.com/x.png", "https://" + "a" * 3000 + ".com/", "http://[fe80::1%25eth0]/", "//example.com"]
urls = st.one_of(st.sampled_from(URLS), json_text)


def deep(levels: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * levels + close * levels).encode()


def assert_no_5xx(response, family: str = "openai") -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
        body = response.json()
        if family == "anthropic":
            assert body["type"] == "error" and body["error"]["message"]
        elif family == "gemini":
            assert body["error"]["status"] and body["error"]["message"]
        else:
            assert body["error"]["message"]


@pytest.fixture
def rich(make_account):
    return make_account("1000000")


# -- the task API ---------------------------------------------------------------------------------

@PROPERTY
@given(limit=url_text, status=url_text, cursor=cursor_text, task_id=url_text)
@example(limit="²", status="", cursor="", task_id="%00")
@example(limit="9" * 5000, status="pending", cursor="\x00", task_id="\x00")
@example(limit="", status="", cursor=EDGE_CURSOR, task_id="x")
def test_task_routes(client, rich, limit, status, cursor, task_id):
    headers = rich.headers
    assert_no_5xx(client.get("/v1/tasks", headers=headers, params={"limit": limit, "status": status,
                                                                   "cursor": cursor}))
    path = quote(task_id, safe="")
    for method, suffix in (("GET", ""), ("POST", "/cancel"), ("GET", "/webhooks"), ("POST", "/webhooks/redeliver")):
        assert_no_5xx(client.request(method, f"/llm-api/v1/tasks/{path}{suffix}", headers=headers))


image_bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["local-image", "narrow-image", "nope"]) | json_values,
    "prompt": json_text | json_values,
    "size": st.sampled_from(["1:1", "16:9", "auto", None]) | json_values,
    "resolution": st.sampled_from(["1k", "4k", None]) | json_values,
    "n": st.sampled_from([1, 2, None, True, 1.0]) | json_values,
    "image_urls": st.lists(urls, max_size=3) | json_values,
    "webhook_url": urls | json_values,
    "extra": json_values,
})
prefers = st.sampled_from([None, "wait=²", "wait=abc", "wait=" + "9" * 30, "wait=0", "wait=-1", "wait", 'wait="0"',
                           "respond-async, wait=0", "wait=0.5"])
idempotency_keys = st.one_of(st.none(), st.sampled_from(["", "k" * 300, "é", "ok-key"]),
                             st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10))


@PROPERTY
@given(body=image_bodies, prefer=prefers, key=idempotency_keys)
@example(body={"model": "local-image", "prompt": "a\x00b"}, prefer=None, key=None)
@example(body={"model": "local-image", "prompt": "\ud800"}, prefer=None, key=None)
@example(body={"model": "local-image", "prompt": "x", "webhook_url": "https://example.com:99999/"}, prefer=None,
         key=None)
@example(body={"model": "local-image", "prompt": "x", "webhook_url": "https://[::1/"}, prefer="wait=²", key=None)
def test_image_submit(client, rich, body, prefer, key):
    headers: dict = {**rich.headers, "Content-Type": "application/json"}
    if prefer is not None:
        headers["Prefer"] = prefer.encode("latin-1")  # a header is bytes: what a server decodes as latin-1
    if key is not None:
        headers["Idempotency-Key"] = key.encode("latin-1")
    assert_no_5xx(client.post("/v1/images/generations", headers=headers, content=json.dumps(body).encode()))


@pytest.mark.parametrize("path, family", [("/v1/images/generations", "openai"), ("/v1/chat/completions", "openai"),
                                          ("/v1/responses", "openai"), ("/anthropic/v1/messages", "anthropic"),
                                          ("/v1beta/models/gemini-2.5-flash:generateContent", "gemini")])
@pytest.mark.parametrize("body", [deep(100_000), deep(2_000), deep(2_000, "{\"a\":", "}"),
                                  b'{"model": "gpt-4o", "x": ' + deep(5_000) + b"}", b"[NaN" + deep(3_000) + b"]"],
                         ids=["array-100000", "array-2000", "object-2000", "nested-field", "nan-and-deep"])
def test_deep_json_is_a_400_in_the_route_shape(client, rich, path, family, body):
    response = client.post(path, headers={**rich.headers, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 400
    assert_no_5xx(response, family)


# -- account, usage and model lists ---------------------------------------------------------------

@PROPERTY
@given(limit=url_text, since=url_text, until=url_text, model=url_text, key=url_text, cursor=cursor_text,
       format_=st.sampled_from(["", "csv", "json", "\x00"]))
@example(limit="", since="", until="9999-12-31", model="", key="", cursor="", format_="")
@example(limit="", since="", until="", model="", key="9" * 25, cursor="", format_="csv")
@example(limit="", since="", until="", model="a\x00", key="9" * 30, cursor="", format_="csv")
@example(limit="", since="", until="", model="", key="", cursor=EDGE_CURSOR, format_="csv")
@example(limit="", since="", until="", model="", key="", cursor=EDGE_CURSOR, format_="")
def test_usage(client, rich, limit, since, until, model, key, cursor, format_):
    response = client.get("/v1/usage", headers=rich.headers, params={
        "limit": limit, "from": since, "to": until, "model": model, "key": key, "cursor": cursor,
        "format": format_})
    assert_no_5xx(response)  # a CSV that broke off mid-body would raise here, in the client


@PROPERTY
@given(model_id=url_text)
@example(model_id="\x00")
@example(model_id="models/../../gpt-4o")
def test_one_model(client, rich, model_id):
    path = quote(model_id, safe="")  # (a client would resolve "../" itself: keep it in the id)
    anthropic = {"x-api-key": rich.key, "anthropic-version": "2023-06-01"}
    for url, headers, family in ((f"/v1/models/{path}", rich.headers, "openai"),
                                 (f"/api.openai.com/v1/models/{path}", rich.headers, "openai"),
                                 (f"/v1/models/{path}", anthropic, "anthropic"),
                                 (f"/anthropic/v1/models/{path}", anthropic, "anthropic"),
                                 (f"/v1beta/models/{path}", {"x-goog-api-key": rich.key}, "gemini")):
        assert_no_5xx(client.get(url, headers=headers), family)


@PROPERTY
@given(limit=url_text, after=url_text, before=url_text, size=url_text, token=url_text)
@example(limit="²", after="", before="", size="²", token="²")
def test_model_lists(client, rich, limit, after, before, size, token):
    assert_no_5xx(client.get("/v1/models", headers=rich.headers))
    assert_no_5xx(client.get("/anthropic/v1/models", headers={"x-api-key": rich.key, "anthropic-version": "2023-06-01"},
                             params={"limit": limit, "after_id": after, "before_id": before}), "anthropic")
    assert_no_5xx(client.get("/v1/models", headers={"x-api-key": rich.key, "anthropic-version": "2023-06-01"},
                             params={"limit": limit}), "anthropic")
    assert_no_5xx(client.get("/v1beta/models", headers={"x-goog-api-key": rich.key},
                             params={"pageSize": size, "pageToken": token}), "gemini")
    assert_no_5xx(client.get("/v1/models", params={"key": rich.key, "pageSize": size, "pageToken": token}), "gemini")


# -- the LLM passthrough --------------------------------------------------------------------------

def llm_bodies(model: str, **required):
    return st.fixed_dictionaries({}, optional={
        "model": st.sampled_from([model, "nope", "gpt-4o\x00"]) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": "yes"}, None]) | json_values,
        "max_tokens": st.sampled_from([1, 0, -1, 10**30, 2.5, "5"]) | json_values,
        "max_completion_tokens": json_values, "max_output_tokens": json_values,
        **{name: st.just(value) | json_values for name, value in required.items()},
    })


MESSAGES = [{"role": "user", "content": "hi [out:2]"}]
LLM_ROUTES = {
    "/v1/chat/completions": ("openai", llm_bodies("gpt-4o", messages=MESSAGES)),
    "/v1/responses": ("openai", llm_bodies("gpt-5.4", input="hi")),
    "/anthropic/v1/messages": ("anthropic", llm_bodies("claude-sonnet-4-6", messages=MESSAGES)),
}


@pytest.mark.parametrize("path", list(LLM_ROUTES))
def test_llm_bodies(client, rich, llm_upstream, path):
    family, bodies = LLM_ROUTES[path]

    @PROPERTY
    @given(body=bodies)
    def check(body):
        assert_no_5xx(client.post(path, headers={**rich.headers, "Content-Type": "application/json"},
                                  content=json.dumps(body).encode()), family)

    check()


@PROPERTY
@given(target=url_text, config=json_values, query=url_text)
@example(target="gemini-2.5-flash:generateContent", config={"maxOutputTokens": "5"}, query="")
@example(target="\x00:generateContent", config=None, query="\x00")
def test_gemini(client, rich, llm_upstream, target, config, query):
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": config}
    response = client.post(f"/v1beta/models/{quote(target, safe=':')}", params={"alt": query},
                           headers={"x-goog-api-key": rich.key}, content=json.dumps(body).encode())
    assert_no_5xx(response, "gemini")
