"""A client request made ready to forward: model mapped, body rewritten where needed, balance held.

The body is parsed to read the model and the limits, but what goes upstream is
the client's own bytes, changed only where they must be (the model name, and
`stream_options.include_usage` on a chat stream that did not ask for usage).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from datetime import datetime

from starlette.requests import ClientDisconnect, Request

from app import money
from app.auth import Principal, require
from app.catalog import Model
from app.errors import APIError, insufficient_balance, invalid
from app.models import utcnow
from app.proxy import upstream
from app.proxy.usage import CHAT, GEMINI, MESSAGES, RESPONSES, estimate

MAX_BODY = 32 * 1024 * 1024
# Output the hold assumes when neither the request nor the catalog bounds it.
DEFAULT_MAX_OUTPUT = 32_768
GEMINI_METHODS = ("generateContent", "streamGenerateContent")
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'
# Record ids need to be unique, not secret: a seeded PRNG spares a system call per request.
_ids = random.Random()


@dataclass
class Call:
    id: str
    api: str
    model: Model
    principal: Principal
    stream: bool
    url: str
    headers: dict[str, str]
    body: bytes
    held: int  # nano-dollars reserved until the call is settled
    strip_usage: bool = False  # the gateway added include_usage: hide the usage chunk
    sse: bool = True  # Gemini streams without ?alt=sse are a JSON array
    created_at: datetime | None = None
    started: float = 0.0  # perf_counter at arrival


async def prepare(request: Request, api: str, *, version: str = "v1beta") -> Call:
    """Authenticate, parse, find the model and hold the most the call can cost.

    Raises APIError (401, 400, 404, 402, 413) before anything is held or sent.
    """
    started = time.perf_counter()
    principal = await require(request, google=api == GEMINI)
    state = request.app.state
    body = await _read_body(request)
    parsed = _parse(body)
    gemini_method = ""
    if api == GEMINI:
        name, _, gemini_method = request.path_params["target"].rpartition(":")
        name = name.removeprefix("models/")
        if gemini_method not in GEMINI_METHODS:
            raise APIError(404, f"Method {gemini_method!r} is not offered for Gemini models here.", code="not_found")
    else:
        name = parsed.get("model")
        if not isinstance(name, str) or not name:
            raise invalid("model", "model: a model name is required.", "missing_model")
    model = state.catalog.get(name, api)
    if model is None:
        raise _model_not_found(api, name, version)

    max_output = _max_output(api, parsed)
    stream = gemini_method == "streamGenerateContent" if api == GEMINI else parsed.get("stream") is True
    strip_usage = False
    if api == CHAT and stream:
        options = parsed.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            body, strip_usage = _with_include_usage(body, parsed), True
    if model.upstream_model != name and api != GEMINI:
        body = _with_model(body, parsed, name, model.upstream_model, strip_usage)

    limit = model.max_output_tokens
    output = min(max_output, limit) if max_output and limit else (max_output or limit or DEFAULT_MAX_OUTPUT)
    # Input is estimated at one token per byte of body: a token is at least a byte of text.
    held = estimate(model, len(body), output)
    call = Call(
        id=f"req_{_ids.getrandbits(96):024x}", api=api, model=model, principal=principal, stream=stream,
        url=upstream.url(model.provider, api, model.upstream_model, version=version, method=gemini_method,
                         query=request.query_params.multi_items()),
        headers=upstream.request_headers(request.scope["headers"], model.provider), body=body, held=held,
        strip_usage=strip_usage, sse=api != GEMINI or request.query_params.get("alt") == "sse",
        created_at=utcnow(), started=started,
    )
    if held and not await state.llm.holds.take(principal.account_id, held):
        raise insufficient_balance(
            f"Your balance is too low for this request to {name}: it can cost up to "
            f"${money.to_decimal(held).normalize():f} (max output {output} tokens). "
            "Top up, or ask for fewer output tokens.")
    return call


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY:
        raise APIError(413, f"The request body is larger than {MAX_BODY // 2**20} MiB.", code="request_too_large")
    try:
        body = await request.body()
    except ClientDisconnect:
        # Nobody is left to answer; an APIError ends the request without an error log.
        raise APIError(400, "The client went away while sending the request.", code="client_disconnected") from None
    if len(body) > MAX_BODY:
        raise APIError(413, f"The request body is larger than {MAX_BODY // 2**20} MiB.", code="request_too_large")
    return body


def _parse(body: bytes) -> dict:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise invalid(None, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(parsed, dict):
        raise invalid(None, "The request body must be a JSON object.", "invalid_json")
    return parsed


def _positive(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _max_output(api: str, parsed: dict) -> int | None:
    if api == CHAT:
        return _positive(parsed.get("max_completion_tokens")) or _positive(parsed.get("max_tokens"))
    if api == RESPONSES:
        return _positive(parsed.get("max_output_tokens"))
    if api == MESSAGES:
        value = _positive(parsed.get("max_tokens"))
        if value is None:
            raise invalid("max_tokens", "max_tokens: Field required (a positive integer).", "missing_max_tokens")
        return value
    config = parsed.get("generationConfig", parsed.get("generation_config"))
    if isinstance(config, dict):
        return _positive(config.get("maxOutputTokens", config.get("max_output_tokens")))
    return None


def _model_not_found(api: str, name: str, version: str) -> APIError:
    if api == GEMINI:
        message = f"models/{name} is not found for API version {version}, or is not offered by this gateway."
    elif api == MESSAGES:
        message = f"model: {name}"
    else:
        message = f"The model `{name}` does not exist or you do not have access to it."
    return APIError(404, message, code="model_not_found", param="model")


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
