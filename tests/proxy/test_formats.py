"""The formats table: a fifth LLM API format is one entry plus its meter, and a model may be
offered on several formats."""

from __future__ import annotations

import dataclasses
import json

import pytest
from starlette.testclient import TestClient

from app.core.catalog import CatalogError, parse
from app.core.errors import OPENAI
from app.proxy import formats, meters
from app.proxy.pricing import Usage
from tests.proxy.conftest import usage_rows
from tests.servers import ThreadedServer


class ToyMeter(meters.SSEMeter):
    """The toy format's stream: `{"type": "text", "text": ...}` events, then `{"type": "done", "usage": ...}`."""

    text = meters.text_fields("text")  # where its text is (the lines that may carry usage: SSEMeter's marker)

    def event(self, event: dict) -> None:
        if event.get("type") == "done" and isinstance(event.get("usage"), dict):
            self.raw, self.final = event["usage"], True


TOY = formats.Format(
    api="toy", label="Toy completions", family=OPENAI, provider_format="openai", paths=("/v1/toy/complete",),
    upstream_path=lambda target: "/toy/complete", max_output=lambda body: formats.limit(body, "limit"),
    usage_field="usage", normalize=lambda raw: Usage(input_tokens=raw.get("in", 0), output_tokens=raw.get("out", 0)),
    meter=ToyMeter, body_text=frozenset({"text"}), endpoint="POST /v1/toy/complete")


async def toy_upstream(scope, receive, send) -> None:
    """The toy provider: a whole answer, or with "stream": true an event stream."""
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"]
            await send({"type": kind + ".complete"})
            if kind == "lifespan.shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body)
    assert request["model"] == "toy-upstream" and scope["path"] == "/toy/complete"
    if request.get("stream"):
        events = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "toy"},
                  {"type": "done", "usage": {"in": 7, "out": 2}}]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for event in events:
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        answer = json.dumps({"text": "Hello toy", "usage": {"in": 7, "out": 2}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


def test_a_fifth_format_is_one_table_entry_and_its_meter(settings, tmp_path, monkeypatch, make_account, engine):
    from app.http.app import create_app

    monkeypatch.setitem(formats.FORMATS, TOY.api, TOY)
    with ThreadedServer(toy_upstream) as upstream:
        catalog = tmp_path / "catalog.toml"
        catalog.write_text(f'''
[providers.toy]
format = "openai"
base_url = "{upstream.url}"
api_key = "sk-toy"

[[models]]
name = "toy-1"
provider = "toy"
api = "toy"
upstream_model = "toy-upstream"
input_per_mtok = "1"
output_per_mtok = "2"
''')
        account = make_account()
        app = create_app(dataclasses.replace(settings, catalog_path=catalog))
        with TestClient(app) as client:
            whole = client.post("/llm-api/v1/toy/complete", headers=account.headers,
                                json={"model": "toy-1", "prompt": "hi", "limit": 5})
            assert whole.status_code == 200 and whole.json()["text"] == "Hello toy"
            with client.stream("POST", "/v1/toy/complete", headers=account.headers,
                               json={"model": "toy-1", "prompt": "hi", "stream": True}) as streamed:
                assert streamed.status_code == 200 and b"Hello " in b"".join(streamed.iter_raw())
            refused = client.post("/v1/toy/complete", headers=account.headers, json={"model": "toy-1", "limit": "5"})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "limit"
            unknown = client.post("/v1/toy/complete", headers=account.headers, json={"model": "gpt-4o"})
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
            page = client.get("/dashboard/models")  # the models page lists the format's endpoint (signed out: login)
            assert page.status_code in (200, 303)
    rows = usage_rows(engine, account.id, count=2)
    assert sorted((r.api_format, r.stream, r.input_tokens, r.output_tokens) for r in rows) == [
        ("toy", False, 7, 2), ("toy", True, 7, 2)]
    # $1 and $2 per 1M tokens: 7 in and 2 out cost 11,000 nano-dollars.
    assert all(r.cost == 11_000 and r.usage_reported and not r.usage_estimated for r in rows)


def test_a_model_offered_on_two_formats(settings, tmp_path, make_account, engine, llm_upstream):
    from app.http.app import create_app
    from tests.conftest import LLM_UPSTREAM

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'''
[providers.openai]
format = "openai"
base_url = "{LLM_UPSTREAM}/openai/v1"
api_key = "sk-upstream-llm-openai"

[[models]]
name = "gpt-5.4"
provider = "openai"
apis = ["chat", "responses"]
input_per_mtok = "1.25"
output_per_mtok = "10.00"
''')
    account = make_account()
    with TestClient(create_app(dataclasses.replace(settings, catalog_path=catalog))) as client:
        chat = client.post("/v1/chat/completions", headers=account.headers,
                           json={"model": "gpt-5.4", "messages": [{"role": "user", "content": "[in:10] [out:4]"}]})
        responses = client.post("/api.openai.com/v1/responses", headers=account.headers,
                                json={"model": "gpt-5.4", "input": "[in:10] [out:4]"})
        assert chat.status_code == responses.status_code == 200
        listed = {m["id"] for m in client.get("/v1/models", headers=account.headers).json()["data"]}
        listed_responses = {m["id"] for m in client.get("/api.openai.com/v1/models", headers=account.headers)
                            .json()["data"]}
        assert "gpt-5.4" in listed and "gpt-5.4" in listed_responses
    assert sorted(r.api_format for r in usage_rows(engine, account.id, count=2)) == ["chat", "responses"]


@pytest.mark.parametrize("model, error", [
    ('api = "chat"\napis = ["chat"]', "api or apis, not both"),
    ('apis = []', "apis must be a list"),
    ('apis = ["chat", "chat"]', "apis must be a list"),
    ('apis = ["image", "chat"]', "image API alone"),
])
def test_bad_apis_stop_the_catalog(model, error):
    text = f'''
[providers.p]
format = "openai"
base_url = "http://x"
api_key = "k"

[[models]]
name = "m"
provider = "p"
{model}
input_per_mtok = "1"
output_per_mtok = "1"
'''
    with pytest.raises(CatalogError, match=error):
        parse(text, {})


@pytest.mark.parametrize("apis, error", [
    ('["chat", "messages"]', "api 'messages' needs a provider of format 'anthropic'"),
    ('["completions"]', "api 'completions' is not one of image, chat"),
])
def test_an_api_its_provider_cannot_serve_stops_startup(apis, error):
    from app.proxy.formats import check

    catalog = parse(f'''
[providers.p]
format = "openai"
base_url = "http://x"
api_key = "k"

[[models]]
name = "m"
provider = "p"
apis = {apis}
input_per_mtok = "1"
output_per_mtok = "1"
''', {})
    with pytest.raises(CatalogError, match=error):
        check(catalog)


def test_every_format_is_reachable_at_its_paths():
    from app.proxy.routes import Router

    router = Router(formats.FORMATS.values())
    for format_ in formats.FORMATS.values():
        for path in format_.paths:
            assert router.match(path)[0].format is format_ and router.match("/llm-api" + path)[0].format is format_
        for prefix, version in format_.path_prefixes:
            endpoint, target = router.match(prefix + "m:generateContent")
            assert (endpoint.format, endpoint.version, target) == (format_, version, "m:generateContent")
    assert router.match("/v1/nothing") is None
