"""One meter per wire format: the tokens the upstream reported, read as the bytes pass by.

A meter never holds a stream back. SSE meters keep only the unfinished last
line between chunks and decode JSON only for the lines that carry usage;
the Gemini JSON-array meter keeps only the text after the last
`"usageMetadata"` it has not finished reading.

Where each format reports usage:
- chat: `usage` of the body, or of the include_usage chunk (`choices: []`)
- responses: `response.usage` of `response.completed` (or `.incomplete` / `.failed`)
- messages: `message.usage` of `message_start`, updated by each `message_delta`'s
  cumulative `usage`
- gemini: the last `usageMetadata` (each chunk repeats the running totals)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import orjson

from app.catalog import Model

CHAT, RESPONSES, MESSAGES, GEMINI = "chat", "responses", "messages", "gemini"
MAX_LINE = 16 * 1024 * 1024  # a longer unfinished line is dropped from metering, not from the stream
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_USAGE_METADATA = re.compile(rb'"usageMetadata"\s*:\s*\{')
_TOKENS_PER_MTOK = 1_000_000
# When the upstream's usage never comes, output is estimated from the generated text: at least a
# token per this many bytes of it (English runs about 4 characters a token; other scripts fewer).
BYTES_PER_TOKEN = 4
_STRING = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'  # a JSON string's raw bytes, escapes included


def _text_fields(*names: str) -> re.Pattern[bytes]:
    return re.compile(rb'"(?:' + b"|".join(n.encode() for n in names) + rb')"\s*:\s*' + _STRING)


# Where each format's stream carries generated text (content, reasoning, tool-call arguments);
# Responses repeats the whole text in its `.done` events, so only its `delta`s count.
CHAT_TEXT = _text_fields("content", "reasoning_content", "reasoning", "refusal", "arguments")
RESPONSES_TEXT = _text_fields("delta")
MESSAGES_TEXT = _text_fields("text", "thinking", "partial_json")
GEMINI_TEXT = _text_fields("text")
# The same in a whole (non-streamed) answer's JSON.
BODY_TEXT_KEYS = {
    CHAT: frozenset({"content", "reasoning_content", "reasoning", "refusal", "arguments"}),
    RESPONSES: frozenset({"text", "arguments"}),
    MESSAGES: frozenset({"text", "thinking"}),
    GEMINI: frozenset({"text"}),
}


@dataclass
class Usage:
    """Tokens as the upstream reported them, in one shape for every format."""

    input_tokens: int = 0  # every prompt token, cached ones and cache writes included
    output_tokens: int = 0  # every generated token, reasoning included
    cached_tokens: int = 0  # prompt tokens read from the provider's cache (a part of input_tokens)
    reasoning_tokens: int = 0  # tokens spent thinking (a part of output_tokens)
    cache_write_5m_tokens: int = 0  # Anthropic: prompt tokens written to a 5-minute cache
    cache_write_1h_tokens: int = 0  # Anthropic: prompt tokens written to a 1-hour cache


def _int(obj, *path: str) -> int:
    for key in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(key)
    return obj if isinstance(obj, int) and not isinstance(obj, bool) and obj > 0 else 0


def normalize(api: str, raw: dict) -> Usage:
    """The Usage of one format's usage object (`raw` is what the upstream sent)."""
    if api == CHAT:
        return Usage(input_tokens=_int(raw, "prompt_tokens"), output_tokens=_int(raw, "completion_tokens"),
                     cached_tokens=_int(raw, "prompt_tokens_details", "cached_tokens"),
                     reasoning_tokens=_int(raw, "completion_tokens_details", "reasoning_tokens"))
    if api == RESPONSES:
        return Usage(input_tokens=_int(raw, "input_tokens"), output_tokens=_int(raw, "output_tokens"),
                     cached_tokens=_int(raw, "input_tokens_details", "cached_tokens"),
                     reasoning_tokens=_int(raw, "output_tokens_details", "reasoning_tokens"))
    if api == MESSAGES:
        # Anthropic's input_tokens leaves out cache reads and writes; they are billed apart.
        written = _int(raw, "cache_creation_input_tokens")
        one_hour = _int(raw, "cache_creation", "ephemeral_1h_input_tokens")
        read = _int(raw, "cache_read_input_tokens")
        return Usage(input_tokens=_int(raw, "input_tokens") + written + read, output_tokens=_int(raw, "output_tokens"),
                     cached_tokens=read, cache_write_5m_tokens=max(0, written - one_hour),
                     cache_write_1h_tokens=min(one_hour, written))
    # Gemini: thoughts are billed as output but not counted in candidatesTokenCount;
    # tool-use prompt tokens are billed as input but not counted in promptTokenCount.
    thoughts = _int(raw, "thoughtsTokenCount")
    return Usage(input_tokens=_int(raw, "promptTokenCount") + _int(raw, "toolUsePromptTokenCount"),
                 output_tokens=_int(raw, "candidatesTokenCount") + thoughts,
                 cached_tokens=_int(raw, "cachedContentTokenCount"), reasoning_tokens=thoughts)


def cost(model: Model, usage: Usage) -> int:
    """What `usage` costs at `model`'s prices, in nano-dollars, rounded up once.

    Cached input is charged at `cached_input_per_mtok` (the input price when the
    catalog gives none). Anthropic cache writes cost 1.25x (5 minutes) or 2x
    (1 hour) the input price, as Anthropic bills them.
    """
    cached = min(usage.cached_tokens, usage.input_tokens)
    cached_price = model.input_per_mtok if model.cached_input_per_mtok is None else model.cached_input_per_mtok
    # Everything times 4 so the 1.25x of 5-minute cache writes stays an integer.
    quarter_units = 4 * ((usage.input_tokens - cached) * model.input_per_mtok + cached * cached_price
                         + usage.output_tokens * model.output_per_mtok)
    quarter_units += (usage.cache_write_5m_tokens + 4 * usage.cache_write_1h_tokens) * model.input_per_mtok
    return -(-quarter_units // (4 * _TOKENS_PER_MTOK))


def estimate(model: Model, input_tokens: int, output_tokens: int) -> int:
    """The most a request can cost: the hold taken before forwarding it."""
    return cost(model, Usage(input_tokens=input_tokens, output_tokens=output_tokens))


def estimated(api: str, raw: dict | None, input_tokens: int, text_bytes: int) -> Usage:
    """The usage to charge when the upstream's final count never came: what it reported so far,
    the input as the hold estimated it unless reported, and the output at least a token per
    BYTES_PER_TOKEN bytes of the text that was generated."""
    reported = normalize(api, raw) if raw is not None else Usage()
    reported.input_tokens = reported.input_tokens or input_tokens
    reported.output_tokens = max(reported.output_tokens, -(-text_bytes // BYTES_PER_TOKEN))
    return reported


def text_bytes(api: str, obj) -> int:
    """The bytes of generated text in a whole answer's parsed JSON."""
    keys = BODY_TEXT_KEYS[api]
    total, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, str):
                    if key in keys:
                        total += len(value.encode("utf-8", "replace"))
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(value for value in item if isinstance(value, (dict, list)))
    return total


def loads(data: bytes):
    """JSON from bytes with orjson (4x faster than json on a small body, 2x on a
    long conversation); json reads what orjson refuses but json accepts (NaN, lone
    surrogate escapes), so a body is read as before, only faster."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def from_body(api: str, body: bytes) -> tuple[dict | None, int]:
    """The raw usage object of a whole (non-streamed) JSON response, or None and the bytes of
    generated text in it (for an estimate)."""
    try:
        obj = loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, 0
    if not isinstance(obj, dict):
        return None, 0
    raw = obj.get("usageMetadata" if api == GEMINI else "usage")
    if isinstance(raw, dict):
        return raw, 0  # the text is counted only for an estimate, which a reported usage makes needless
    return None, text_bytes(api, obj)


class SSEMeter:
    """Meters a server-sent-event stream; `feed` every chunk, then `finish`.

    `raw` is the usage reported so far and `final` whether it is the upstream's last word;
    until it is, `text_bytes` counts the generated text, for an estimate should it never come.
    """

    marker = _USAGE
    text = CHAT_TEXT

    def __init__(self, api: str):
        self.api = api
        self.raw: dict | None = None
        self.final = False
        self.text_bytes = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:] if len(data) - cut <= MAX_LINE else b""
        if cut:
            self._count(data, cut)
            if self.marker.search(data, 0, cut):
                for line in data[:cut].split(b"\n"):
                    self._line(line)

    def _count(self, data: bytes, end: int) -> None:
        if not self.final:
            self.text_bytes += sum(map(len, self.text.findall(data, 0, end)))

    def finish(self) -> None:
        tail, self._tail = self._tail, b""
        self._count(tail, len(tail))
        self._line(tail)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or not self.marker.search(line):
            return
        try:
            event = loads(line[5:])
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(event, dict):
            self.event(event)

    def event(self, event: dict) -> None:
        """Take the usage out of one decoded event (chat: the include_usage chunk, the last)."""
        raw = event.get("usage")
        if isinstance(raw, dict):
            self.raw = raw
            self.final = True


class ResponsesMeter(SSEMeter):
    text = RESPONSES_TEXT

    def event(self, event: dict) -> None:
        response = event.get("response")
        if isinstance(response, dict) and isinstance(response.get("usage"), dict):
            self.raw = response["usage"]
            self.final = True  # response.completed, .incomplete or .failed: the last event


class MessagesMeter(SSEMeter):
    text = MESSAGES_TEXT

    def event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            usage = event["message"].get("usage")
            if isinstance(usage, dict):
                self.raw = dict(usage)
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            # The delta's counts are cumulative: they replace, field by field.
            merged = dict(self.raw or {})
            merged.update({k: v for k, v in event["usage"].items() if v is not None})
            self.raw = merged
            self.final = True  # message_delta comes once, after the last content block


def _finished(event: dict) -> bool:
    """A Gemini chunk whose candidates carry a finishReason: the last, with the final usage."""
    candidates = event.get("candidates")
    return isinstance(candidates, list) and any(isinstance(c, dict) and c.get("finishReason") for c in candidates)


class GeminiSSEMeter(SSEMeter):
    marker = _USAGE_METADATA
    text = GEMINI_TEXT

    def event(self, event: dict) -> None:
        raw = event.get("usageMetadata")
        if isinstance(raw, dict):
            self.raw = raw  # every chunk repeats the running totals
            self.final = self.final or _finished(event)


class ChatStripMeter(SSEMeter):
    """Chat stream where the gateway added `include_usage`: meter, and drop the usage-only chunk.

    `filter` returns what the client should get. It passes whole lines only (an
    SSE client can do nothing with half a line), so at most one unfinished line
    waits for the next chunk.
    """

    def __init__(self, api: str = CHAT):
        super().__init__(api)
        self._skip_blank = False

    def filter(self, chunk: bytes) -> bytes:
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:]
        out = data[:cut]
        if out:
            self._count(out, len(out))
        if self._skip_blank and out:
            self._skip_blank = False
            if out.startswith(b"\r\n"):
                out = out[2:]
            elif out.startswith(b"\n"):
                out = out[1:]
        if not out or not self.marker.search(out):
            return out
        # Cut out the lines that are usage-only chunks (and the blank line closing each).
        pieces, pos = [], 0
        while (found := self.marker.search(out, pos)) is not None:
            start = out.rfind(b"\n", 0, found.start()) + 1
            end = out.find(b"\n", found.end()) + 1  # `out` ends with a newline
            if not self._usage_only(out[start:end].rstrip(b"\r\n")):
                pieces.append(out[pos:end])
            else:
                pieces.append(out[pos:start])
                if out.startswith(b"\r\n", end):
                    end += 2
                elif out.startswith(b"\n", end):
                    end += 1
                elif end == len(out):
                    self._skip_blank = True
            pos = end
        pieces.append(out[pos:])
        return b"".join(pieces)

    def flush(self) -> bytes:
        """The last unfinished line, at the end of the stream."""
        tail, self._tail = self._tail, b""
        self._count(tail, len(tail))
        return b"" if self._usage_only(tail) else tail

    def _usage_only(self, line: bytes) -> bool:
        if not line.startswith(b"data:") or not self.marker.search(line):
            return False
        try:
            event = loads(line[5:])
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(event, dict) or not isinstance(event.get("usage"), dict):
            return False
        self.raw = event["usage"]
        self.final = True
        return not event.get("choices")


class GeminiArrayMeter:
    """Meters Gemini's streamed JSON array (streamGenerateContent without alt=sse)."""

    def __init__(self, api: str = GEMINI):
        self.api = api
        self.raw: dict | None = None
        self.final = False
        self.text_bytes = 0
        self._finishing = False  # a finishReason was seen: the usage after it is the last
        self._buf = b""
        self._decoder = json.JSONDecoder()

    def feed(self, chunk: bytes) -> None:
        if not self.final:
            # Per chunk: a text split across two chunks goes uncounted (Gemini sends whole elements).
            self.text_bytes += sum(map(len, GEMINI_TEXT.findall(chunk)))
            self._finishing = self._finishing or b'"finishReason"' in chunk
        buf = self._buf + chunk
        while True:
            match = _USAGE_METADATA.search(buf)
            if match is None:
                self._buf = buf[-64:]  # enough to find a marker split across chunks
                return
            start = match.end() - 1
            try:
                # The usage object is ASCII, so its character offsets are byte offsets.
                obj, length = self._decoder.raw_decode(buf[start:].decode("utf-8", "replace"))
            except ValueError:
                self._buf = buf[match.start():] if len(buf) - match.start() <= MAX_LINE else b""
                return
            if isinstance(obj, dict):
                self.raw = obj
                self.final = self.final or self._finishing
            buf = buf[start + length:]

    def finish(self) -> None:
        self._buf = b""


def meter_for(api: str, *, strip: bool = False, sse: bool = True):
    if api == CHAT:
        return ChatStripMeter() if strip else SSEMeter(CHAT)
    if api == RESPONSES:
        return ResponsesMeter(RESPONSES)
    if api == MESSAGES:
        return MessagesMeter(MESSAGES)
    return GeminiSSEMeter(GEMINI) if sse else GeminiArrayMeter()
