"""Channels and failover: a model's call moves to its next channel before anything reaches the
client, only the channel that answered is charged, and a failing channel cools down.

One app serves a catalog made here: for each way of failing and each API format, a model whose
first channel fails that way (a fake provider under /fail/{how}) and whose second is the good
fake. Models are apart per test, so one test's cooldowns don't touch another's.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from starlette.testclient import TestClient

from tests.conftest import LLM_UPSTREAM
from tests.fakes.llm import TEXT
from tests.proxy.conftest import usage_rows

FORMATS = {  # api: (provider format, fake path, good provider's upstream model)
    "chat": ("openai", "openai/v1", "gpt-4o"),
    "responses": ("openai", "openai/v1", "gpt-5.4"),
    "messages": ("anthropic", "anthropic", "claude-sonnet-4-6"),
    "gemini": ("gemini", "gemini", "gemini-2.5-flash"),
}
KEYS = {"openai": "sk-upstream-llm-openai", "anthropic": "sk-ant-upstream", "gemini": "upstream-gemini-llm-key"}
FAILURES = ["refused", "stall", "500", "503", "529", "401", "429", "429ra", "400"]
# Models per failure and format: for whole calls, for streams, and for the cooldown tests.
KINDS = ("whole", "stream")
MODEL_KINDS = (*KINDS, "cool")


def _catalog() -> str:
    parts = []
    for fmt, key in KEYS.items():
        path = {"openai": "openai/v1", "anthropic": "anthropic", "gemini": "gemini"}[fmt]
        parts.append(f'[providers.good-{fmt}]\nformat = "{fmt}"\nbase_url = "{LLM_UPSTREAM}/{path}"\n'
                     f'api_key = "{key}"\n')
        for how in FAILURES:
            base = "http://127.0.0.1:9" if how == "refused" else f"{LLM_UPSTREAM}/fail/{how}"
            parts.append(f'[providers.{how}-{fmt}]\nformat = "{fmt}"\nbase_url = "{base}/{path}"\napi_key = "{key}"\n'
                         f'timeout = 0.5\n')
    for api, (fmt, _, upstream) in FORMATS.items():
        for how in FAILURES:
            for kind in MODEL_KINDS:
                parts.append(f'[[models]]\nname = "{how}-{api}-{kind}"\napi = "{api}"\ninput_per_mtok = "1"\n'
                             f'output_per_mtok = "1"\n\n[[models.channels]]\nprovider = "{how}-{fmt}"\n'
                             # a channel is a provider and a model there: one per test, apart
                             f'upstream_model = "{upstream}-{kind}"\n\n[[models.channels]]\nprovider = "good-{fmt}"\n'
                             f'upstream_model = "{upstream}"\npriority = 1\n')
    return "\n".join(parts)


@pytest.fixture(scope="module")
def failing(settings, tmp_path_factory, llm_upstream):
    from app.http.app import create_app

    catalog = tmp_path_factory.mktemp("failover") / "catalog.toml"
    catalog.write_text(_catalog())
    app = create_app(dataclasses.replace(settings, catalog_path=catalog))
    with TestClient(app) as client:
        yield client


def _call(client, account, api: str, model: str, *, stream: bool):
    prompt = "[in:100] [out:20]"
    if api == "gemini":
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return client.post(f"/v1beta/models/{model}:{method}", headers=account.headers,
                           json={"contents": [{"parts": [{"text": prompt}]}]})
    path = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}[api]
    body: dict = {"model": model, "stream": stream}
    if api == "responses":
        body["input"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    if api == "messages":
        body["max_tokens"] = 100
    return client.post(path, headers=account.headers, json=body)


@pytest.mark.parametrize("how", [h for h in FAILURES if h != "400"])
@pytest.mark.parametrize("api", list(FORMATS))
def test_a_failing_channel_is_left_for_the_next_and_only_the_answer_is_charged(failing, make_account, engine,
                                                                              llm_upstream, api, how):
    account = make_account()
    for kind in KINDS:
        response = _call(failing, account, api, f"{how}-{api}-{kind}", stream=kind == "stream")
        assert response.status_code == 200, response.text
        assert TEXT.split()[0] in response.text
    records = sorted(usage_rows(engine, account.id, count=2), key=lambda record: record.id)
    assert [r.attempts for r in records] == [2, 2]
    for record in records:
        assert record.channel == f"good-{FORMATS[api][0]}"
        assert (record.input_tokens, record.output_tokens) == (100, 20)  # the good channel's usage
        assert record.cost == 120 * 1000 and record.usage_reported and not record.usage_estimated


@pytest.mark.parametrize("how", ["503", "refused", "429ra"])
def test_a_channel_failing_in_a_row_cools_down_and_is_probed_after(failing, make_account, engine, llm_upstream,
                                                                   how):
    from app.proxy.channels import channel_key

    account = make_account()
    model = f"{how}-chat-cool"
    services = failing.app.state.services
    # 429 with Retry-After cools at once; other failures after three in a row.
    needed = 1 if how == "429ra" else 3
    before = llm_upstream.failures.get(how, 0)
    for _ in range(needed + 2):
        assert _call(failing, account, "chat", model, stream=False).status_code == 200
    records = usage_rows(engine, account.id, count=needed + 2)
    attempts = [r.attempts for r in sorted(records, key=lambda r: r.id)]
    assert attempts == [2] * needed + [1, 1]  # then the failing channel is skipped: one attempt each
    if how != "refused":
        assert llm_upstream.failures[how] - before == needed
    # Once its cooldown is over, one call probes it; it fails again and cools for longer.
    cooldowns = services.llm.cooldowns
    channel = services.catalog.get(model, "chat").channels[0]
    state = cooldowns._states[channel_key(channel)]
    state.until = cooldowns.clock() - 0.01
    assert _call(failing, account, "chat", model, stream=False).status_code == 200
    probe = usage_rows(engine, account.id, count=needed + 3)
    assert sorted(probe, key=lambda r: r.id)[-1].attempts == 2
    # Cooling again: for twice as long (60 s), or for the Retry-After (30 s) again.
    assert state.until > cooldowns.clock() + (25 if how == "429ra" else 55)


def test_a_single_429_without_retry_after_does_not_disable_a_channel(failing, make_account, engine, llm_upstream):
    account = make_account()
    before = llm_upstream.failures.get("429", 0)
    for _ in range(2):
        assert _call(failing, account, "messages", "429-messages-cool", stream=True).status_code == 200
    assert llm_upstream.failures["429"] - before == 2  # tried both times


def test_a_client_error_goes_back_as_is_and_the_next_channel_is_never_called(failing, make_account, engine,
                                                                            llm_upstream):
    account = make_account()
    def good_calls() -> int:
        return sum(1 for call in llm_upstream.calls if not call["path"].startswith("/fail/"))

    before = good_calls()
    response = _call(failing, account, "chat", "400-chat-whole", stream=False)
    assert response.status_code == 400 and json.loads(response.text)["error"]["message"] == "fake failure 400"
    assert good_calls() == before  # the good channel was never called
    record = usage_rows(engine, account.id)[0]
    assert (record.channel, record.attempts, record.cost) == ("400-openai", 1, 0)


def test_every_channel_failing_answers_the_last_ones_error(settings, tmp_path, make_account, engine, llm_upstream):
    from app.http.app import create_app

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'''
[providers.down-a]
format = "openai"
base_url = "{LLM_UPSTREAM}/fail/503/openai/v1"
api_key = "k"

[providers.down-b]
format = "openai"
base_url = "{LLM_UPSTREAM}/fail/500/openai/v1"
api_key = "k"

[[models]]
name = "all-down"
api = "chat"
input_per_mtok = "1"
output_per_mtok = "1"

[[models.channels]]
provider = "down-a"

[[models.channels]]
provider = "down-b"
priority = 1
''')
    account = make_account()
    with TestClient(create_app(dataclasses.replace(settings, catalog_path=catalog))) as client:
        response = _call(client, account, "chat", "all-down", stream=False)
    assert response.status_code == 500 and "fake failure 500" in response.text  # the last channel's answer
    record = usage_rows(engine, account.id)[0]
    assert (record.channel, record.attempts, record.cost) == ("down-b", 2, 0)


def test_a_refused_key_is_left_for_the_providers_next_and_stops_being_used(settings, tmp_path, make_account, engine,
                                                                          llm_upstream):
    from app.http.app import create_app

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'''
[providers.two-keys]
format = "openai"
base_url = "{LLM_UPSTREAM}/openai/v1"
api_keys = ["sk-revoked-at-the-provider", "sk-upstream-llm-openai"]

[[models]]
name = "keyed"
provider = "two-keys"
upstream_model = "gpt-4o"
api = "chat"
input_per_mtok = "1"
output_per_mtok = "1"
''')
    account = make_account()
    with TestClient(create_app(dataclasses.replace(settings, catalog_path=catalog))) as client:
        for _ in range(4):
            assert _call(client, account, "chat", "keyed", stream=False).status_code == 200
    attempts = [r.attempts for r in sorted(usage_rows(engine, account.id, count=4), key=lambda r: r.id)]
    # The first call met the revoked key, and went again with the other; after that it is skipped.
    assert attempts == [2, 1, 1, 1]
    sent = [c["headers"]["authorization"] for c in llm_upstream.calls[-5:]]
    assert sent.count("Bearer sk-revoked-at-the-provider") == 1


def test_cooldowns_order_rotate_and_probe():
    from app.core.catalog import Channel, Provider
    from app.proxy.channels import Cooldowns

    now = [100.0]
    cooldowns = Cooldowns(failures=2, seconds=10, clock=lambda: now[0])
    a, b, c = (Channel(Provider(n, "openai", "http://x", ("k1", "k2")), "m", priority=p, weight=w)
               for n, p, w in (("a", 0, 3), ("b", 0, 1), ("c", 1, 1)))
    firsts = [cooldowns.order([a, b, c])[0].provider.name for _ in range(400)]
    assert 240 < firsts.count("a") < 360 and firsts.count("c") == 0  # weight 3 to 1; priority 1 after
    assert [cooldowns.key_for(a.provider) for _ in range(4)] == ["k1", "k2", "k1", "k2"]  # keys rotate
    cooldowns.failed(a, "HTTP 503")
    assert "a" in [ch.provider.name for ch in cooldowns.order([a, b, c])]  # one failure: still in
    cooldowns.failed(a, "HTTP 503")
    assert [ch.provider.name for ch in cooldowns.order([a, b, c])] == ["b", "c"]  # two in a row: cooling
    cooldowns.failed(b, "x", retry_after=5)
    cooldowns.failed(c, "x", retry_after=20)
    assert [ch.provider.name for ch in cooldowns.order([a, b, c])] == ["b"]  # all cooling: the one free first
    now[0] += 11
    cooldowns.attempt(a)  # a's cooldown has ended: this call probes it ...
    assert "a" not in [ch.provider.name for ch in cooldowns.order([a, b, c])]  # ... and the others skip it
    now[0] += 61  # a probe whose call never ended (cancelled) does not keep the channel away for ever
    assert "a" in [ch.provider.name for ch in cooldowns.order([a, b, c])]
    cooldowns.succeeded(a)
    assert cooldowns.order([a, b, c])[0].provider.name in ("a", "b")
    cooldowns.failed(c, "x", retry_after=100)
    assert cooldowns.health([a])[0]["state"] == "ok" and cooldowns.health([c])[0]["state"] == "cooling_down"
