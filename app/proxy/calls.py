"""A client request made ready to forward: model mapped, body rewritten where needed, balance held.

The body is parsed to read the model and the limits, but what goes upstream is
the client's own bytes, changed only where they must be (the model name, and
`stream_options.include_usage` on a chat stream that did not ask for usage).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope

from app.core import money, params
from app.core.auth import Principal, key_from_headers
from app.core.catalog import Channel, Model
from app.core.errors import APIError, insufficient_balance, invalid
from app.core.models import time_ordered_id, utcnow
from app.core.services import Services
from app.proxy import upstream
from app.proxy.formats import Format, Target, flag
from app.proxy.pricing import estimate

MAX_BODY = 32 * 1024 * 1024
# Output the hold assumes when neither the request nor the catalog bounds it.
DEFAULT_MAX_OUTPUT = 32_768
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


@dataclass
class Call:
    id: str
    format: Format
    model: Model
    principal: Principal
    stream: bool
    body: bytes  # as it goes upstream, but for the model's name on a channel that renames it
    held: int  # nano-dollars reserved until the call is settled
    client_headers: dict[str, str] = field(default_factory=dict)  # lower-case names, as the client sent them
    query: list[tuple[str, str]] = field(default_factory=list)
    parsed: dict[str, Any] = field(default_factory=dict)
    version: str = "v1beta"  # Gemini's API version, from the route
    method: str = ""  # Gemini's method
    input_estimate: int = 0  # the input tokens the hold assumed (one per byte of body)
    strip_usage: bool = False  # the gateway added include_usage: hide the usage chunk
    created_at: datetime = field(default_factory=utcnow)
    started: float = 0.0  # perf_counter at arrival

    def request(self, channel: Channel, key: str) -> tuple[str, dict[str, str], bytes]:
        """The URL, headers and body of this call sent through `channel` with `key`."""
        body = self.body
        if channel.upstream_model != self.model.name and not self.format.model_in_path:
            body = _with_model(body, self.parsed, self.model.name, channel.upstream_model, self.strip_usage)
        url = upstream.url(channel.provider, self.format, Target(channel.upstream_model, self.version, self.method),
                           self.query)
        return url, upstream.request_headers(self.client_headers, channel.provider, key), body


class ClientGone(Exception):
    """The client went away before its request was read: there is nobody to answer."""


async def prepare(scope: Scope, receive: Receive, state: Services, format_: Format, *, version: str = "v1beta",
                  target: str = "") -> Call:
    """Authenticate, read and parse the request, find the model and hold the most the call can cost.

    Works on the raw ASGI scope: this runs on every LLM call, and a Starlette
    Request would parse the headers and query again for each thing asked of it.
    `state` is the app's state; `target` is a Gemini route's `{model}:{method}`.
    Raises APIError (401, 400, 404, 402, 413) before anything is held or sent.
    """
    started = time.perf_counter()
    client = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    raw_query = scope.get("query_string")
    query = parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True) if raw_query else []
    google = format_.model_in_path
    principal = await state.auth.check(
        key_from_headers(client, google=google, query_key=_param(query, "key") if google else None))
    body = await _read_body(receive, client.get("content-length"))
    parsed = _parse(body)
    gemini_method = ""
    if google:
        name, _, gemini_method = target.rpartition(":")
        name = name.removeprefix("models/")
        if gemini_method not in format_.methods:
            raise APIError(404, f"Method {gemini_method!r} is not offered for Gemini models here.", code="not_found")
    else:
        named = parsed.get("model")
        if not isinstance(named, str) or not named:
            raise invalid("model", "model: a model name is required.", "missing_model")
        name = named
    model = state.catalog.get(name, format_.api)
    if model is None:
        raise APIError(404, format_.not_found(name, version), code="model_not_found", param="model")

    max_output = format_.max_output(parsed)
    stream = format_.streams(parsed, gemini_method)
    strip_usage = False
    if format_.asks_for_usage:
        options = parsed.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise invalid("stream_options", "stream_options: must be an object.", "invalid_type")
        include_usage = flag(options, "include_usage", "stream_options.include_usage") if options else False
        if stream and not include_usage:
            body, strip_usage = _with_include_usage(body, parsed), True

    limit = model.max_output_tokens
    output = min(max_output, limit) if max_output and limit else (max_output or limit or DEFAULT_MAX_OUTPUT)
    # Input is estimated at one token per byte of body: a token is at least a byte of text.
    held = estimate(model, len(body), output)
    call = Call(
        id=time_ordered_id("req_"), format=format_, model=model, principal=principal, stream=stream, body=body,
        held=held, client_headers=client, query=query, parsed=parsed, version=version, method=gemini_method,
        input_estimate=len(body), strip_usage=strip_usage,
        created_at=utcnow(), started=started,
    )
    if held and not await state.llm.holds.take(principal.account_id, held):
        raise insufficient_balance(
            f"Your balance is too low for this request to {name}: it can cost up to "
            f"${money.to_decimal(held).normalize():f} (max output {output} tokens). "
            "Top up, or ask for fewer output tokens.")
    return call


def _param(query: list[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in query if key == name), None)


async def _read_body(receive: Receive, length: str | None) -> bytes:
    declared = params.content_length(length)
    if declared is not None and declared > MAX_BODY:
        raise _too_large()
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _too_large()
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large() -> APIError:
    return APIError(413, f"The request body is larger than {MAX_BODY // 2**20} MiB.", code="request_too_large")


def _parse(body: bytes) -> dict:
    parsed = params.json_body(body)
    if not isinstance(parsed, dict):
        raise invalid(None, "The request body must be a JSON object.", "invalid_json")
    model = parsed.get("model")
    if isinstance(model, str) and not params.is_clean(model):
        raise invalid("model", "model: contains a NUL character or an unpaired surrogate.")
    return parsed


def _with_include_usage(body: bytes, parsed: dict) -> bytes:
    if "stream_options" not in parsed:
        start = body.index(b"{") + 1  # the body parsed as an object, so it has one
        return body[:start] + _INCLUDE_USAGE + body[start:]
    options = parsed["stream_options"] if isinstance(parsed["stream_options"], dict) else {}
    return json.dumps({**parsed, "stream_options": {**options, "include_usage": True}},
                      ensure_ascii=False, separators=(",", ":")).encode()


def _with_model(body: bytes, parsed: dict, name: str, upstream_model: str, changed: bool) -> bytes:
    """`body` with the top-level model renamed, every other byte kept where that can be checked."""
    pattern = rb'("model"\s*:\s*)' + re.escape(json.dumps(name).encode())
    renamed, count = re.subn(pattern, lambda m: m.group(1) + json.dumps(upstream_model).encode(), body, count=1)
    expected = {**parsed, "model": upstream_model}
    if changed:
        options = parsed.get("stream_options")
        expected["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if count == 1:
        try:
            if json.loads(renamed) == expected:
                return renamed
        except ValueError:
            pass
    return json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()
