"""The real OpenAI, Anthropic and Google SDKs against the gateway on loopback, as the docs configure them.

Each test checks the text the SDK returns, the usage record written, and the
exact cost charged (computed here by hand from the catalog's prices).
"""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai
import pytest
from google import genai
from google.genai import types

from app.core import money
from tests.fakes.llm import TEXT
from tests.proxy.conftest import money_state, usage_rows

PROMPT = "Say hello. [in:1000] [out:50] [cached:200] [reasoning:20]"


def usd(per_mtok_sum: Decimal | int) -> int:
    """Nano-dollars of a sum of (tokens x USD per 1M tokens)."""
    return money.from_usd(Decimal(per_mtok_sum) / 1_000_000)


# gpt-4o: $2.50 in, $1.25 cached in, $10 out: 800 x 2.50 + 200 x 1.25 + 50 x 10
GPT4O_COST = usd(800 * Decimal("2.50") + 200 * Decimal("1.25") + 50 * 10)
# gpt-5.4: $1.25 in, $0.125 cached, $10 out
GPT54_COST = usd(800 * Decimal("1.25") + 200 * Decimal("0.125") + 50 * 10)
# claude-sonnet-4-6: $3 in, $0.30 cache reads, $15 out (input_tokens 1000 excludes the 200 cache reads)
CLAUDE_COST = usd(1000 * 3 + 200 * Decimal("0.30") + 50 * 15)
# gemini-2.5-flash: $0.30 in, $0.075 cached, $2.50 out; thoughts (20) are output on top of the 50
GEMINI_COST = usd(800 * Decimal("0.30") + 200 * Decimal("0.075") + 70 * Decimal("2.50"))


def check_record(engine, account, *, model, api, stream, cost, input_tokens=1000, output_tokens=50,
                 cached=200, reasoning=20):
    record = usage_rows(engine, account.id)[0]
    assert (record.model, record.api_format, record.stream) == (model, api, stream)
    assert (record.input_tokens, record.output_tokens, record.cached_tokens, record.reasoning_tokens) == (
        input_tokens, output_tokens, cached, reasoning)
    assert record.usage_reported and record.upstream_status == 200 and not record.client_disconnected
    assert record.cost == cost and cost > 0
    assert record.latency_ms >= 0 and record.ttfb_ms is not None
    balance, _, ledger_sum = money_state(engine, account.id)
    assert balance == money.from_usd("10") - cost == ledger_sum


def test_openai_chat(base, account, engine):
    client = openai.OpenAI(api_key=account.key, base_url=base + "/v1")
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}])
    assert reply.choices[0].message.content == TEXT
    assert reply.usage.prompt_tokens == 1000
    check_record(engine, account, model="gpt-4o", api="chat", stream=False, cost=GPT4O_COST)


def test_openai_chat_stream(base, account, engine, llm_upstream):
    client = openai.OpenAI(api_key=account.key, base_url=base + "/v1")
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}],
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    # The gateway asked for usage upstream and hid the usage-only chunk the client did not ask for.
    assert all(c.choices for c in chunks)
    sent = llm_upstream.last("/chat/completions")
    assert b'"include_usage":true' in sent["body"]
    check_record(engine, account, model="gpt-4o", api="chat", stream=True, cost=GPT4O_COST)


def test_openai_chat_stream_with_usage_requested(base, account, engine):
    client = openai.OpenAI(api_key=account.key, base_url=base + "/v1")
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": PROMPT}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 50
    check_record(engine, account, model="gpt-4o", api="chat", stream=True, cost=GPT4O_COST)


def test_openai_responses_hermes_base_url(base, account, engine):
    # Hermes Agent's GPT-5 setting: base_url .../llm-api/api.openai.com/v1
    client = openai.OpenAI(api_key=account.key, base_url=base + "/api.openai.com/v1")
    response = client.responses.create(model="gpt-5.4", input=PROMPT)
    assert response.output_text == TEXT
    assert response.usage.output_tokens_details.reasoning_tokens == 20
    check_record(engine, account, model="gpt-5.4", api="responses", stream=False, cost=GPT54_COST)


def test_openai_responses_stream(base, account, engine):
    client = openai.OpenAI(api_key=account.key, base_url=base + "/v1")
    events = list(client.responses.create(model="gpt-5.4", input=PROMPT, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == TEXT
    assert events[-1].type == "response.completed" and events[-1].response.usage.input_tokens == 1000
    check_record(engine, account, model="gpt-5.4", api="responses", stream=True, cost=GPT54_COST)


def test_openai_models_lists(base, account):
    chat = openai.OpenAI(api_key=account.key, base_url=base + "/v1")
    ids = [m.id for m in chat.models.list()]
    assert "gpt-4o" in ids and "qwen-max" in ids
    assert "gpt-5.4" not in ids and "claude-sonnet-4-6" not in ids and "local-image" not in ids
    # Under the Responses base URL: every model on OpenAI's formats (a client set up there calls both).
    responses = openai.OpenAI(api_key=account.key, base_url=base + "/api.openai.com/v1")
    listed = [m.id for m in responses.models.list()]
    assert "gpt-5.4" in listed and "gpt-4o" in listed and "claude-sonnet-4-6" not in listed


def test_openai_models_retrieve(base, account):
    for root in ("/v1", "/api.openai.com/v1"):
        client = openai.OpenAI(api_key=account.key, base_url=base + root)
        model = client.models.retrieve("gpt-4o")
        assert (model.id, model.object, model.owned_by) == ("gpt-4o", "model", "llm-openai")
        assert client.models.retrieve("gpt-5.4").id == "gpt-5.4"
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("no-such-model")
        assert missing.value.body["code"] == "model_not_found"


def test_chat_completions_under_the_responses_base_url(base, account, engine, llm_upstream):
    # Hermes Agent with the hosted docs' GPT-5 config sends chat completions to this base URL.
    client = openai.OpenAI(api_key=account.key, base_url=base + "/api.openai.com/v1")
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}])
    assert reply.choices[0].message.content == TEXT
    check_record(engine, account, model="gpt-4o", api="chat", stream=False, cost=GPT4O_COST)


def test_anthropic_messages_hermes_base_url(base, account, engine, llm_upstream):
    # Hermes Agent's and OpenClaw's Claude setting: base_url .../llm-api/anthropic
    client = anthropic.Anthropic(api_key=account.key, base_url=base + "/anthropic",
                                 default_headers={"anthropic-beta": "fake-beta-2026"})
    message = client.messages.create(model="claude-sonnet-4-6", max_tokens=1024,
                                     messages=[{"role": "user", "content": PROMPT}])
    assert message.content[0].text == TEXT
    assert message.usage.input_tokens == 1000
    sent = llm_upstream.last("/anthropic/v1/messages")["headers"]
    # The provider's key the Anthropic way; the SDK's version and beta headers kept; the llm_ key gone.
    assert sent["x-api-key"] == "sk-ant-upstream" and sent["anthropic-beta"] == "fake-beta-2026"
    assert sent["anthropic-version"]
    assert account.key not in str(sent)
    check_record(engine, account, model="claude-sonnet-4-6", api="messages", stream=False, cost=CLAUDE_COST,
                 input_tokens=1200, reasoning=0)


def test_anthropic_messages_stream(base, account, engine):
    client = anthropic.Anthropic(api_key=account.key, base_url=base + "/anthropic")
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=1024,
                                messages=[{"role": "user", "content": PROMPT}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT and final.usage.output_tokens == 50
    check_record(engine, account, model="claude-sonnet-4-6", api="messages", stream=True, cost=CLAUDE_COST,
                 input_tokens=1200, reasoning=0)


def test_anthropic_on_the_root_messages_route(base, account, engine):
    client = anthropic.Anthropic(api_key=account.key, base_url=base)  # POST /llm-api/v1/messages
    message = client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                                     messages=[{"role": "user", "content": PROMPT}])
    assert message.content[0].text == TEXT


def test_anthropic_models_list(base, account):
    client = anthropic.Anthropic(api_key=account.key, base_url=base + "/anthropic")
    assert [m.id for m in client.models.list()] == ["claude-sonnet-4-6", "slow-claude"]


def test_anthropic_models_retrieve(base, account):
    # Hermes asks for the model to learn its context window: under /anthropic, and at /v1/models/{id}.
    for root in (base + "/anthropic", base):
        client = anthropic.Anthropic(api_key=account.key, base_url=root)
        model = client.models.retrieve("claude-sonnet-4-6")
        assert (model.id, model.type) == ("claude-sonnet-4-6", "model")
        with pytest.raises(anthropic.NotFoundError) as missing:
            client.models.retrieve("gpt-4o")  # not a Messages model
        assert missing.value.body["type"] == "error"


def gemini_client(base, key, version=None) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=base + "/", api_version=version))


def test_gemini_generate_content(base, account, engine, llm_upstream):
    client = gemini_client(base, account.key)  # the SDK's default path: /v1/models/...:generateContent
    reply = client.models.generate_content(model="gemini-2.5-flash", contents=PROMPT)
    assert reply.text == TEXT
    assert reply.usage_metadata.thoughts_token_count == 20
    sent = llm_upstream.last(":generateContent")
    assert sent["path"] == "/gemini/v1/models/gemini-2.5-flash:generateContent"
    assert sent["headers"]["x-goog-api-key"] == "upstream-gemini-llm-key" and account.key not in str(sent)
    check_record(engine, account, model="gemini-2.5-flash", api="gemini", stream=False, cost=GEMINI_COST,
                 output_tokens=70)


def test_gemini_generate_content_stream_v1beta(base, account, engine, llm_upstream):
    client = gemini_client(base, account.key, "v1beta")
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents=PROMPT))
    assert "".join(c.text for c in chunks) == TEXT
    sent = llm_upstream.last(":streamGenerateContent")
    assert sent["path"] == "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert sent["query"] == "alt=sse"
    check_record(engine, account, model="gemini-2.5-flash", api="gemini", stream=True, cost=GEMINI_COST,
                 output_tokens=70)


def test_gemini_models_get(base, account):
    client = gemini_client(base, account.key, "v1beta")
    model = client.models.get(model="gemini-2.5-flash")
    assert model.name == "models/gemini-2.5-flash" and model.output_token_limit == 65536


def test_gemini_models_list(base, account):
    for version in ("v1beta", None):  # None: the SDK's default, GET /v1/models with x-goog-api-key
        client = gemini_client(base, account.key, version)
        assert [m.name for m in client.models.list()] == ["models/gemini-2.5-flash"]
