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


def loads(data: bytes):
    """JSON from bytes with orjson (4x faster than json on a small body, 2x on a
    long conversation); json reads what orjson refuses but json accepts (NaN, lone
    surrogate escapes), so a body is read as before, only faster."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def from_body(api: str, body: bytes) -> dict | None:
    """The raw usage object of a whole (non-streamed) JSON response, or None."""
    try:
        obj = loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    raw = obj.get("usageMetadata" if api == GEMINI else "usage")
    return raw if isinstance(raw, dict) else None


class SSEMeter:
    """Meters a server-sent-event stream; `feed` every chunk, then `finish`."""

    marker = _USAGE

    def __init__(self, api: str):
        self.api = api
        self.raw: dict | None = None
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:] if len(data) - cut <= MAX_LINE else b""
        if cut and self.marker.search(data, 0, cut):
            for line in data[:cut].split(b"\n"):
                self._line(line)

    def finish(self) -> None:
        tail, self._tail = self._tail, b""
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
        """Take the usage out of one decoded event (chat and Gemini: the event's own)."""
        raw = event.get("usage")
        if isinstance(raw, dict):
            self.raw = raw


class ResponsesMeter(SSEMeter):
    def event(self, event: dict) -> None:
        response = event.get("response")
        if isinstance(response, dict) and isinstance(response.get("usage"), dict):
            self.raw = response["usage"]


class MessagesMeter(SSEMeter):
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


class GeminiSSEMeter(SSEMeter):
    marker = _USAGE_METADATA

    def event(self, event: dict) -> None:
        raw = event.get("usageMetadata")
        if isinstance(raw, dict):
            self.raw = raw


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
        return not event.get("choices")


class GeminiArrayMeter:
    """Meters Gemini's streamed JSON array (streamGenerateContent without alt=sse)."""

    def __init__(self, api: str = GEMINI):
        self.api = api
        self.raw: dict | None = None
        self._buf = b""
        self._decoder = json.JSONDecoder()

    def feed(self, chunk: bytes) -> None:
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
