"""Meters: the tokens an upstream reports, read from its answer as the bytes pass by.

A meter never holds a stream back. SSE meters keep only the unfinished last line
between chunks and decode JSON only for the lines that carry usage; the Gemini
JSON-array meter keeps only the text after the last `"usageMetadata"` it has not
finished reading. Until its final usage arrives, a meter also counts the bytes of
generated text, for an estimate should that usage never come.

Which meter serves which API format, and where each format reports its usage, is
app.proxy.formats' table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Protocol

import orjson

MAX_LINE = 16 * 1024 * 1024  # a longer unfinished line is dropped from metering, not from the stream
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_USAGE_METADATA = re.compile(rb'"usageMetadata"\s*:\s*\{')
_STRING = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'  # a JSON string's raw bytes, escapes included


def text_fields(*names: str) -> re.Pattern[bytes]:
    """A pattern for the string values of these keys in raw JSON (the stream's generated text)."""
    return re.compile(rb'"(?:' + b"|".join(n.encode() for n in names) + rb')"\s*:\s*' + _STRING)


# Where each format's stream carries generated text (content, reasoning, tool-call arguments);
# Responses repeats the whole text in its `.done` events, so only its `delta`s count.
CHAT_TEXT = text_fields("content", "reasoning_content", "reasoning", "refusal", "arguments")
RESPONSES_TEXT = text_fields("delta")
MESSAGES_TEXT = text_fields("text", "thinking", "partial_json")
GEMINI_TEXT = text_fields("text")


class Meter(Protocol):
    """What the forwarding reads of a meter: the usage so far, whether it is final, the text seen."""

    raw: dict | None
    final: bool
    text_bytes: int

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> None: ...


def loads(data: bytes) -> Any:
    """JSON from bytes with orjson (several times json's speed: docs/performance.md); json reads
    what orjson refuses but json accepts (NaN, lone surrogate escapes), so an answer is read as
    before, only faster."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def text_bytes(obj: Any, keys: Iterable[str]) -> int:
    """The bytes of generated text in a whole answer's parsed JSON: the string values of `keys`."""
    wanted = frozenset(keys)
    total, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, str):
                    if key in wanted:
                        total += len(value.encode("utf-8", "replace"))
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(value for value in item if isinstance(value, (dict, list)))
    return total


class SSEMeter:
    """Meters a server-sent-event stream; `feed` every chunk, then `finish`. A subclass says
    which lines may carry usage (`marker`), where the text is (`text`) and reads an event.

    `raw` is the usage reported so far and `final` whether it is the upstream's last word;
    until it is, `text_bytes` counts the generated text, for an estimate should it never come.
    """

    marker = _USAGE
    text = CHAT_TEXT

    def __init__(self) -> None:
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
        """Take the usage out of one decoded event."""
        raise NotImplementedError


class ChatMeter(SSEMeter):
    def event(self, event: dict) -> None:
        raw = event.get("usage")  # the include_usage chunk, the last
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


class ChatStripMeter(ChatMeter):
    """Chat stream where the gateway added `include_usage`: meter, and drop the usage-only chunk.

    `filter` returns what the client should get. It passes whole lines only (an
    SSE client can do nothing with half a line), so at most one unfinished line
    waits for the next chunk.
    """

    def __init__(self) -> None:
        super().__init__()
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

    def __init__(self) -> None:
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
