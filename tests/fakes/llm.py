"""A loopback fake of the OpenAI (Chat Completions, Responses), Anthropic Messages and Gemini APIs.

It speaks each wire format as the providers document it (bodies, SSE event
framing, usage objects, error shapes) so the real SDKs parse what comes back
through the gateway. Behaviour is chosen by markers anywhere in the request
body, so tests running side by side don't step on each other:

    [in:N] [out:N] [cached:N] [reasoning:N]   the usage reported (defaults 12 and 5)
    [cw5m:N] [cw1h:N]     Anthropic cache writes
    [chunks:N]            the text comes in N deltas (default 3)
    [status:N]            answer that status with the provider's error JSON
    [hang:N]              stream N deltas, then wait until the client goes away
    [drop:N]              stream N deltas, then break the connection
    [slow:MS]             wait MS milliseconds before each delta
    [wait:MS]             wait MS milliseconds before answering at all
    [tail:MS]             stream the text, then wait MS milliseconds before the event with the final usage
    [sse]                 stream the answer even when the request did not ask for a stream
    [nousage]             Chat Completions: report no usage (a whole answer without `usage`, a stream without its chunk)
    [tag:NAME]            keep the exact bytes sent under NAME (see `sent`, `opened`, `closed`)

A provider whose base URL starts with `/fail/{how}` fails every call that way, whatever the
body says: `{how}` is a status (`500`, `503`, `529`, `401`, `400`, ...), `429ra` (a 429 with
`Retry-After: 30`), or `stall` (no answer until the client leaves). `failures[how]` counts them.

A request without a field its provider requires (chat: model and messages; Responses: model;
Messages: model, messages and max_tokens; Gemini: contents) gets the provider's 400.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

KEYS = {"openai": "Bearer sk-upstream-llm-openai", "anthropic": "sk-ant-upstream", "gemini": "upstream-gemini-llm-key"}
TEXT = "Hello from the fake upstream."
CREATED = 1_767_225_600


def marker(body: bytes, name: str, default=None):
    found = re.search(rb"\[" + name.encode() + rb"(?::([^\]]*))?\]", body)
    if not found:
        return default
    value = (found.group(1) or b"").decode()
    return int(value) if value.isdigit() else value


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _pieces(n: int) -> list[str]:
    words = TEXT.split(" ")
    n = max(1, n)
    out = [" ".join(words[i * len(words) // n:(i + 1) * len(words) // n]) for i in range(n)]
    return [piece if i == 0 else " " + piece for i, piece in enumerate(out)]


class Plan:
    """What one request asked the fake to do."""

    def __init__(self, body: bytes):
        self.input = marker(body, "in", 12)
        self.output = marker(body, "out", 5)
        self.cached = marker(body, "cached", 0)
        self.reasoning = marker(body, "reasoning", 0)
        self.cw5m = marker(body, "cw5m", 0)
        self.cw1h = marker(body, "cw1h", 0)
        self.pieces = _pieces(marker(body, "chunks", 3))
        self.status = marker(body, "status")
        self.hang = marker(body, "hang")
        self.drop = marker(body, "drop")
        self.slow = marker(body, "slow", 0) / 1000
        self.wait = marker(body, "wait", 0) / 1000
        self.tail = marker(body, "tail", 0) / 1000
        self.sse = marker(body, "sse") is not None
        self.no_usage = marker(body, "nousage") is not None
        # Text as sent: `marker` would turn an all-digit tag into a number (and lose leading zeros).
        tag = re.search(rb"\[tag:([^\]]*)\]", body)
        self.tag = tag.group(1).decode() if tag else None


# ---- OpenAI Chat Completions -------------------------------------------------------------------

def chat_usage(p: Plan) -> dict:
    return {"prompt_tokens": p.input, "completion_tokens": p.output, "total_tokens": p.input + p.output,
            "prompt_tokens_details": {"cached_tokens": p.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": p.reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def chat_body(p: Plan, model: str) -> bytes:
    body = {"id": "chatcmpl-fake1", "object": "chat.completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT, "refusal": None,
                                                 "annotations": []},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": chat_usage(p), "service_tier": "default", "system_fingerprint": "fp_fake"}
    if p.no_usage:
        del body["usage"]
    return _json(body)


def chat_events(p: Plan, model: str, include_usage: bool) -> list[bytes]:
    def chunk(delta: dict, finish=None, choices=True) -> bytes:
        obj = {"id": "chatcmpl-fake1", "object": "chat.completion.chunk", "created": CREATED, "model": model,
               "service_tier": "default", "system_fingerprint": "fp_fake",
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        if include_usage:
            obj["usage"] = None
        return b"data: " + _json(obj) + b"\n\n"

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": piece}) for piece in p.pieces]
    events.append(chunk({}, "stop"))
    if include_usage:
        last = json.loads(chunk({}, choices=False)[6:])
        last["usage"] = chat_usage(p)
        events.append(b"data: " + _json(last) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


# ---- OpenAI Responses --------------------------------------------------------------------------

def _response(p: Plan, model: str, status: str, text: str | None) -> dict:
    output = [] if text is None else [{"id": "msg_fake1", "type": "message", "status": "completed",
                                       "role": "assistant", "content": [
                                           {"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    return {"id": "resp_fake1", "object": "response", "created_at": CREATED, "status": status, "background": False,
            "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
            "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled", "user": None, "metadata": {},
            "usage": None if text is None else {
                "input_tokens": p.input, "input_tokens_details": {"cached_tokens": p.cached},
                "output_tokens": p.output, "output_tokens_details": {"reasoning_tokens": p.reasoning},
                "total_tokens": p.input + p.output}}


def responses_body(p: Plan, model: str) -> bytes:
    return _json(_response(p, model, "completed", TEXT))


def responses_events(p: Plan, model: str) -> list[bytes]:
    seq = iter(range(10_000))

    def event(kind: str, **fields) -> bytes:
        return f"event: {kind}\n".encode() + b"data: " + _json({"type": kind, "sequence_number": next(seq),
                                                                 **fields}) + b"\n\n"

    item = {"id": "msg_fake1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    events = [event("response.created", response=_response(p, model, "in_progress", None)),
              event("response.in_progress", response=_response(p, model, "in_progress", None)),
              event("response.output_item.added", output_index=0, item=item),
              event("response.content_part.added", item_id="msg_fake1", output_index=0, content_index=0, part=part)]
    events += [event("response.output_text.delta", item_id="msg_fake1", output_index=0, content_index=0,
                     delta=piece, logprobs=[]) for piece in p.pieces]
    done_part = {**part, "text": TEXT}
    events += [event("response.output_text.done", item_id="msg_fake1", output_index=0, content_index=0, text=TEXT,
                     logprobs=[]),
               event("response.content_part.done", item_id="msg_fake1", output_index=0, content_index=0,
                     part=done_part),
               event("response.output_item.done", output_index=0,
                     item={**item, "status": "completed", "content": [done_part]}),
               event("response.completed", response=_response(p, model, "completed", TEXT))]
    return events


# ---- Anthropic Messages ------------------------------------------------------------------------

def messages_usage(p: Plan, output: int) -> dict:
    return {"input_tokens": p.input, "cache_creation_input_tokens": p.cw5m + p.cw1h,
            "cache_read_input_tokens": p.cached,
            "cache_creation": {"ephemeral_5m_input_tokens": p.cw5m, "ephemeral_1h_input_tokens": p.cw1h},
            "output_tokens": output, "service_tier": "standard"}


def messages_body(p: Plan, model: str) -> bytes:
    return _json({"id": "msg_fake1", "type": "message", "role": "assistant", "model": model,
                  "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn", "stop_sequence": None,
                  "usage": messages_usage(p, p.output)})


def messages_events(p: Plan, model: str) -> list[bytes]:
    def event(kind: str, obj: dict) -> bytes:
        return f"event: {kind}\n".encode() + b"data: " + _json({"type": kind, **obj}) + b"\n\n"

    events = [event("message_start", {"message": {
                  "id": "msg_fake1", "type": "message", "role": "assistant", "model": model, "content": [],
                  "stop_reason": None, "stop_sequence": None, "usage": messages_usage(p, 1)}}),
              event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
              b'event: ping\ndata: {"type": "ping"}\n\n']
    events += [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
               for piece in p.pieces]
    final = messages_usage(p, p.output)
    final.pop("service_tier")
    events += [event("content_block_stop", {"index": 0}),
               event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": final}),
               event("message_stop", {})]
    return events


# ---- Gemini ------------------------------------------------------------------------------------

def gemini_chunk(p: Plan, model: str, text: str, candidates: int, finish: bool) -> dict:
    usage = {"promptTokenCount": p.input, "candidatesTokenCount": candidates,
             "totalTokenCount": p.input + candidates + p.reasoning,
             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": p.input}]}
    if p.cached:
        usage["cachedContentTokenCount"] = p.cached
    if p.reasoning:
        usage["thoughtsTokenCount"] = p.reasoning
    candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": "fakeResp1"}


def gemini_body(p: Plan, model: str) -> bytes:
    return json.dumps(gemini_chunk(p, model, TEXT, p.output, True), indent=2).encode()


def gemini_events(p: Plan, model: str, sse: bool) -> list[bytes]:
    n = len(p.pieces)
    chunks = [gemini_chunk(p, model, piece, p.output * (i + 1) // n, i == n - 1) for i, piece in enumerate(p.pieces)]
    if sse:
        return [b"data: " + _json(c) + b"\r\n\r\n" for c in chunks]
    # The JSON array as Gemini streams it: pretty-printed elements, ",\r\n" between them.
    parts = [json.dumps(c, indent=2).encode() for c in chunks]
    return [b"[" + parts[0]] + [b"\n,\r\n" + part for part in parts[1:]] + [b"\n]"]


# ---- errors ------------------------------------------------------------------------------------

def missing_field(path: str, request: dict) -> str | None:
    """The first required field the request lacks, as the providers refuse it with a 400."""
    if path.startswith("/gemini"):
        required = ["contents"]
    elif path.endswith("/chat/completions"):
        required = ["model", "messages"]
    elif path.endswith("/responses"):
        required = ["model"]
    else:
        required = ["model", "messages", "max_tokens"]
    return next((name for name in required if request.get(name) is None), None)


def error_body(fmt: str, status: int, message: str) -> bytes:
    if fmt == "anthropic":
        kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
                529: "overloaded_error"}.get(status, "api_error")
        return _json({"type": "error", "error": {"type": kind, "message": message}})
    if fmt == "gemini":
        names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"}
        return _json({"error": {"code": status, "message": message, "status": names.get(status, "UNAVAILABLE")}})
    kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "api_error")
    return _json({"error": {"message": message, "type": kind, "param": None, "code": None}})


HEADERS = {
    "openai": [(b"x-request-id", b"req_fake_openai"), (b"openai-processing-ms", b"12"),
               (b"openai-organization", b"org-upstream-secret"), (b"x-ratelimit-limit-requests", b"10000"),
               (b"x-ratelimit-remaining-requests", b"9999"), (b"set-cookie", b"__cf_bm=upstream; path=/")],
    "anthropic": [(b"request-id", b"req_fake_anthropic"), (b"anthropic-ratelimit-requests-remaining", b"49"),
                  (b"anthropic-organization-id", b"org-upstream-secret")],
    "gemini": [(b"x-goog-request-id", b"fake-gemini-1"), (b"vary", b"Origin")],
}


class Events(dict):
    """An event per tag, made by whichever thread asks first: the fake's or the test's.

    Not a defaultdict: its factory runs Python code, so two threads asking for a new tag
    at once could each make an event, and the test could wait on the one nobody sets."""

    def __missing__(self, tag: str) -> threading.Event:
        return self.setdefault(tag, threading.Event())


class FakeLLMUpstream:
    def __init__(self):
        self.calls: list[dict] = []
        self.sent: dict[str, bytes] = {}
        self.opened = Events()
        self.closed = Events()
        self.in_flight = 0
        self.failures: dict[str, int] = {}  # the `/fail/{how}` calls, by how

    def last(self, path_part: str) -> dict:
        return next(c for c in reversed(self.calls) if path_part in c["path"])

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        self.calls.append({"path": path, "query": scope["query_string"].decode(), "headers": headers,
                           "body": body, "client": tuple(scope["client"] or ())})
        self.in_flight += 1
        try:
            await self._answer(path, scope["query_string"].decode(), headers, body, receive, send)
        finally:
            self.in_flight -= 1

    async def _answer(self, path, query, headers, body, receive, send):
        if path.startswith("/fail/"):
            how, _, rest = path[len("/fail/"):].partition("/")
            self.failures[how] = self.failures.get(how, 0) + 1
            return await self._fail(how, "/" + rest, receive, send)
        fmt = "anthropic" if path.startswith("/anthropic") else "gemini" if path.startswith("/gemini") else "openai"
        given = headers.get("x-api-key") if fmt == "anthropic" else (
            headers.get("x-goog-api-key") if fmt == "gemini" else headers.get("authorization"))
        p = Plan(body)
        if p.tag:
            self.opened[p.tag].set()
        if p.wait and await self._client_left(receive, p.wait):
            if p.tag:
                self.closed[p.tag].set()
            return
        if given != KEYS[fmt]:
            return await self._whole(send, fmt, 401, error_body(fmt, 401, "invalid upstream key"), p)
        if p.status:
            return await self._whole(send, fmt, p.status, error_body(fmt, p.status, "fake upstream error"), p)
        request = json.loads(body)
        missing = missing_field(path, request)
        if missing:
            return await self._whole(send, fmt, 400, error_body(fmt, 400, f"{missing}: Field required"), p)
        if fmt == "gemini":
            model, _, method = path.rpartition("/")[2].partition(":")
            if method == "generateContent":
                return await self._whole(send, fmt, 200, gemini_body(p, model), p)
            sse = "alt=sse" in query
            events = gemini_events(p, model, sse)
            return await self._stream(send, receive, fmt, events, p, offset=0, final=len(events) - 1,
                                      content_type=b"text/event-stream" if sse else b"application/json; charset=UTF-8")
        model = request["model"]
        stream = request.get("stream") is True or p.sse
        if path.endswith("/chat/completions"):
            if not stream:
                return await self._whole(send, fmt, 200, chat_body(p, model), p)
            include = (request.get("stream_options") or {}).get("include_usage") is True and not p.no_usage
            events = chat_events(p, model, include)
            return await self._stream(send, receive, fmt, events, p, offset=1, final=len(events) - 2)
        if path.endswith("/responses"):
            if not stream:
                return await self._whole(send, fmt, 200, responses_body(p, model), p)
            events = responses_events(p, model)
            return await self._stream(send, receive, fmt, events, p, offset=4, final=len(events) - 1)
        if not stream:
            return await self._whole(send, fmt, 200, messages_body(p, model), p)
        events = messages_events(p, model)
        return await self._stream(send, receive, fmt, events, p, offset=3, final=len(events) - 2)

    async def _fail(self, how: str, path: str, receive, send):
        fmt = "anthropic" if path.startswith("/anthropic") else "gemini" if path.startswith("/gemini") else "openai"
        if how == "stall":
            await self._client_left(receive, 30)
            return
        status = 429 if how == "429ra" else int(how)
        headers = [(b"content-type", b"application/json"), *([(b"retry-after", b"30")] if how == "429ra" else [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": error_body(fmt, status, f"fake failure {how}")})

    @staticmethod
    async def _client_left(receive, seconds: float) -> bool:
        """Wait `seconds`; True if the client went away meanwhile."""
        async def gone():
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            await asyncio.wait_for(gone(), seconds)
            return True
        except TimeoutError:
            return False

    async def _whole(self, send, fmt, status, body, p: Plan):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *HEADERS[fmt]]})
        if p.tag:  # before the last send: the client may have it all before this coroutine runs again
            self.sent[p.tag] = body
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, send, receive, fmt, events, p: Plan, *, offset: int, final: int,
                      content_type: bytes = b"text/event-stream; charset=utf-8"):
        """Send `events`; `offset` is how many come before the first text delta, `final` the index of
        the one with the final usage (before which `[tail:MS]` waits)."""
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache"), *HEADERS[fmt]]})
        sent = b""
        stop_at = p.hang if p.hang is not None else p.drop
        for index, event in enumerate(events):
            if stop_at is not None and index == offset + stop_at:
                if p.tag:
                    self.sent[p.tag] = sent
                if p.drop is not None:
                    return  # without finishing the response: the server breaks the connection
                while (await asyncio.wait_for(receive(), 30))["type"] != "http.disconnect":
                    pass
                if p.tag:
                    self.closed[p.tag].set()
                return
            if index >= offset and p.slow:
                await asyncio.sleep(p.slow)
            if index == final and p.tail:
                await asyncio.sleep(p.tail)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            sent += event
        if p.tag:  # before the last send: the client may have it all before this coroutine runs again
            self.sent[p.tag] = sent
        await send({"type": "http.response.body", "body": b"", "more_body": False})
