"""The meters read usage from every format's wire bytes, however the bytes are split; costs are exact."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from app.core import money
from app.core.catalog import Channel, Model, Provider
from app.proxy.formats import CHAT, FORMATS, GEMINI, MESSAGES, RESPONSES, read_answer, stream_meter
from app.proxy.meters import ChatStripMeter
from app.proxy.pricing import Usage, cost, estimate, estimated
from tests.fakes.llm import (
    Plan,
    chat_body,
    chat_events,
    gemini_body,
    gemini_events,
    messages_body,
    messages_events,
    responses_body,
    responses_events,
)


def normalize(api: str, raw: dict) -> Usage:
    return FORMATS[api].normalize(raw)


def from_body(api: str, body: bytes) -> tuple[dict | None, int]:
    return read_answer(FORMATS[api], body)


def meter_for(api: str, *, sse: bool = True):
    return stream_meter(FORMATS[api], sse=sse)

PLAN = Plan(b"[in:1000] [out:50] [cached:200] [reasoning:20] [cw5m:300] [cw1h:100] [chunks:4]")
PROVIDER = Provider("p", "openai", "http://x")


def model(input_usd: str, output_usd: str, cached_usd: str | None = None) -> Model:
    return Model(name="m", channels=(Channel(PROVIDER, "m"),), apis=("chat",),
                 input_per_mtok=money.from_usd(input_usd), output_per_mtok=money.from_usd(output_usd),
                 cached_input_per_mtok=money.from_usd(cached_usd) if cached_usd else None)


def splits(data: bytes):
    """The stream cut into pieces of several sizes, down to one byte."""
    for size in (1, 2, 3, 7, 64, len(data)):
        yield [data[i:i + size] for i in range(0, len(data), size)]


STREAMS = {
    CHAT: (b"".join(chat_events(PLAN, "gpt-4o", include_usage=True)), True),
    RESPONSES: (b"".join(responses_events(PLAN, "gpt-5.4")), True),
    MESSAGES: (b"".join(messages_events(PLAN, "claude")), True),
    GEMINI: (b"".join(gemini_events(PLAN, "gemini", sse=True)), True),
    "gemini-array": (b"".join(gemini_events(PLAN, "gemini", sse=False)), False),
}
EXPECTED = {
    CHAT: Usage(input_tokens=1000, output_tokens=50, cached_tokens=200, reasoning_tokens=20),
    RESPONSES: Usage(input_tokens=1000, output_tokens=50, cached_tokens=200, reasoning_tokens=20),
    # Anthropic's input_tokens leaves out cache reads (200) and writes (300 + 100).
    MESSAGES: Usage(input_tokens=1600, output_tokens=50, cached_tokens=200, cache_write_5m_tokens=300,
                    cache_write_1h_tokens=100),
    # Gemini's thoughts are output on top of candidatesTokenCount.
    GEMINI: Usage(input_tokens=1000, output_tokens=70, cached_tokens=200, reasoning_tokens=20),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_meters_read_the_final_usage_however_the_bytes_come(name):
    data, sse = STREAMS[name]
    api = GEMINI if name == "gemini-array" else name
    for pieces in splits(data):
        meter = meter_for(api, sse=sse)
        for piece in pieces:
            meter.feed(piece)
        meter.finish()
        assert normalize(api, meter.raw) == EXPECTED[api], (name, len(pieces))


@pytest.mark.parametrize("api,body", [(CHAT, chat_body(PLAN, "m")), (RESPONSES, responses_body(PLAN, "m")),
                                      (MESSAGES, messages_body(PLAN, "m")), (GEMINI, gemini_body(PLAN, "m"))])
def test_whole_bodies(api, body):
    assert normalize(api, from_body(api, body)[0]) == EXPECTED[api]


def test_an_error_body_has_no_usage():
    assert from_body(CHAT, b'{"error": {"message": "no"}}') == (None, 0)
    assert from_body(CHAT, b"not json") == (None, 0)


def test_anthropic_partial_stream_charges_message_start_usage():
    events = messages_events(PLAN, "claude")
    meter = meter_for(MESSAGES)
    for event in events[:4]:  # message_start, block start, ping, one delta: then the client left
        meter.feed(event)
    assert normalize(MESSAGES, meter.raw) == Usage(input_tokens=1600, output_tokens=1, cached_tokens=200,
                                                   cache_write_5m_tokens=300, cache_write_1h_tokens=100)


def test_strip_meter_removes_only_the_usage_chunk_and_meters_it():
    events = chat_events(PLAN, "gpt-4o", include_usage=True)
    usage_chunk = events[-2]
    assert b'"choices":[]' in usage_chunk
    expected = b"".join(events[:-2] + events[-1:])
    for pieces in splits(b"".join(events)):
        meter = ChatStripMeter()
        out = b"".join(meter.filter(piece) for piece in pieces) + meter.flush()
        assert out == expected
        assert normalize(CHAT, meter.raw) == EXPECTED[CHAT]


def test_strip_meter_keeps_a_usage_chunk_that_also_has_choices():
    # Some OpenAI-compatible upstreams put usage on the last content chunk: that chunk must stay.
    line = b'data: ' + json.dumps({"choices": [{"delta": {"content": "x"}}], "usage": {"prompt_tokens": 3}}).encode()
    meter = ChatStripMeter()
    assert meter.filter(line + b"\n\n") == line + b"\n\n"
    assert meter.raw == {"prompt_tokens": 3}


def test_cost_is_exact_integer_nano_dollars():
    gpt4o = model("2.50", "10.00", "1.25")
    # 800 uncached x $2.50 + 200 cached x $1.25 + 50 out x $10, per 1M tokens.
    assert cost(gpt4o, EXPECTED[CHAT]) == money.from_usd("0.00275")
    claude = model("3.00", "15.00", "0.30")
    # 1000 plain input x $3 + 300 5m-writes x $3.75 + 100 1h-writes x $6 + 200 reads x $0.30 + 50 x $15.
    expected = (1000 * 3 + 300 * Decimal("3.75") + 100 * 6 + 200 * Decimal("0.30") + 50 * 15) / 1_000_000
    assert cost(claude, EXPECTED[MESSAGES]) == money.from_usd(expected) == money.from_usd("0.0055350")
    # No cached price in the catalog: cached tokens cost the input price.
    assert cost(model("1", "2"), Usage(input_tokens=10, cached_tokens=10)) == money.from_usd("0.00001")


def test_cost_rounds_up_once_to_a_nano_dollar():
    tiny = model("0.0001", "0.0005")  # 0.1 and 0.5 nano-dollars a token
    assert cost(tiny, Usage(input_tokens=1, output_tokens=1)) == 1  # 0.6, not 1 + 1
    assert cost(tiny, Usage(input_tokens=3, output_tokens=3)) == 2  # 1.8


def test_estimate_is_input_and_output_at_full_price():
    assert estimate(model("2.50", "10.00", "1.25"), 400, 100) == money.from_usd("0.002")


TEXT_BYTES = len(b"Hello from the fake upstream.")
EVENTS = {
    CHAT: lambda: chat_events(PLAN, "m", include_usage=True),
    RESPONSES: lambda: responses_events(PLAN, "m"),
    MESSAGES: lambda: messages_events(PLAN, "m"),
    GEMINI: lambda: gemini_events(PLAN, "m", sse=True),
}


@pytest.mark.parametrize("api", list(EVENTS))
def test_a_whole_stream_ends_final_with_every_byte_of_text_counted(api):
    events = EVENTS[api]()
    for pieces in splits(b"".join(events)):
        meter = meter_for(api)
        for piece in pieces:
            meter.feed(piece)
        meter.finish()
        assert meter.final and normalize(api, meter.raw) == EXPECTED[api]
        # Counting stops once the final usage is in: nothing comes after it that would be charged.
        assert meter.text_bytes == TEXT_BYTES


@pytest.mark.parametrize("api", list(EVENTS))
def test_a_stream_cut_before_its_usage_is_not_final(api):
    events = EVENTS[api]()
    cut = {CHAT: -2, RESPONSES: -1, MESSAGES: -2, GEMINI: -1}[api]  # the event with the final usage
    meter = meter_for(api)
    for event in events[:cut]:
        meter.feed(event)
    meter.finish()
    assert not meter.final and meter.text_bytes > 0


def test_gemini_array_meter_counts_text_and_knows_the_last_chunk():
    events = gemini_events(PLAN, "m", sse=False)
    meter = meter_for(GEMINI, sse=False)
    for event in events[:-2]:  # the last element is "]" alone: stop before the last chunk
        meter.feed(event)
    assert not meter.final and meter.text_bytes > 0
    for event in events[-2:]:
        meter.feed(event)
    assert meter.final and meter.text_bytes == TEXT_BYTES


def test_strip_meter_counts_text_and_is_final_with_the_usage_chunk():
    events = chat_events(PLAN, "gpt-4o", include_usage=True)
    meter = ChatStripMeter()
    for event in events[:-2]:
        meter.filter(event)
    assert not meter.final and meter.text_bytes == TEXT_BYTES
    meter.filter(events[-2])
    assert meter.final


@pytest.mark.parametrize("api,body", [(CHAT, chat_body(PLAN, "m")), (RESPONSES, responses_body(PLAN, "m")),
                                      (MESSAGES, messages_body(PLAN, "m")), (GEMINI, gemini_body(PLAN, "m"))])
def test_whole_bodies_without_usage_count_their_text(api, body):
    # Counted only when there is no usage to charge: then it is what the estimate is made from.
    assert from_body(api, body)[1] == 0
    bare = json.loads(body)
    del bare["usageMetadata" if api == GEMINI else "usage"]
    assert from_body(api, json.dumps(bare).encode()) == (None, TEXT_BYTES)


def test_an_estimate_takes_what_was_reported_and_at_least_a_token_per_four_bytes():
    # Reported input is kept; output is the larger of the reported count and the text's estimate.
    assert estimated(normalize(MESSAGES, {"input_tokens": 100, "output_tokens": 1}), 999, 10) == Usage(
        input_tokens=100, output_tokens=3)
    assert estimated(normalize(GEMINI, {"promptTokenCount": 7, "candidatesTokenCount": 40}), 999, 10) == Usage(
        input_tokens=7, output_tokens=40)
    # Nothing reported: the input as the hold estimated it.
    assert estimated(None, 250, 1) == Usage(input_tokens=250, output_tokens=1)
