"""The LLM API formats, one entry each: everything that differs between them, in one table.

An entry says where the format is served (its paths), how its errors look (the family),
how its request names the model, whether it streams and how much output it may ask for,
where the call goes upstream, where the answer reports usage and how that usage reads,
which meter follows its stream and where its text is. The passthrough, the catalog check,
the model lists and the dashboard all read this table; none of them branches on a format's
name. Adding a format is an entry here plus, if its stream is new, a meter.

Providers have formats of their own (`openai`, `anthropic`, `gemini`): how their key is sent.
A provider format may serve several API formats (`openai` serves Chat Completions and
Responses), and a model may be offered on several API formats of its provider's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from app.core.catalog import Catalog, CatalogError
from app.core.errors import ANTHROPIC, API_PREFIX, OPENAI, invalid
from app.core.errors import GEMINI as GEMINI_FAMILY
from app.proxy import meters
from app.proxy.pricing import Usage

CHAT, RESPONSES, MESSAGES, GEMINI = "chat", "responses", "messages", "gemini"
ANTHROPIC_VERSION = "2023-06-01"  # sent to Anthropic when the client sends none (curl, some agents)


# -- reading a request's fields ---------------------------------------------------------------------
# The fields the gateway itself reads must mean to it what they mean to the provider: a `stream`
# of "true" taken as false would have the gateway buffer a stream it can't meter. Each is refused
# unless it is absent, null, or of the type the provider documents.

def flag(obj: Mapping, name: str, param: str | None = None) -> bool:
    value = obj.get(name)
    if value is None or isinstance(value, bool):
        return value is True
    raise invalid(param or name, f"{param or name}: must be true or false.", "invalid_type")


def limit(obj: Mapping, name: str, param: str | None = None) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid(param or name, f"{param or name}: must be a whole number of at least 1.", "invalid_value")
    return value


def _chat_max_output(body: Mapping) -> int | None:
    completion, legacy = limit(body, "max_completion_tokens"), limit(body, "max_tokens")
    return completion or legacy


def _responses_max_output(body: Mapping) -> int | None:
    return limit(body, "max_output_tokens")


def _messages_max_output(body: Mapping) -> int | None:
    value = limit(body, "max_tokens")
    if value is None:
        raise invalid("max_tokens", "max_tokens: Field required (a positive integer).", "missing_max_tokens")
    return value


def _gemini_max_output(body: Mapping) -> int | None:
    for key in ("generationConfig", "generation_config"):
        config = body.get(key)
        if config is None:
            continue
        if not isinstance(config, dict):
            raise invalid(key, f"{key}: must be an object.", "invalid_type")
        for name in ("maxOutputTokens", "max_output_tokens"):
            if config.get(name) is not None:
                return limit(config, name, f"{key}.{name}")
    return None


# -- reading an answer's usage ----------------------------------------------------------------------

def _int(obj: object, *path: str) -> int:
    for key in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(key)
    return obj if isinstance(obj, int) and not isinstance(obj, bool) and obj > 0 else 0


def _chat_usage(raw: dict) -> Usage:
    return Usage(input_tokens=_int(raw, "prompt_tokens"), output_tokens=_int(raw, "completion_tokens"),
                 cached_tokens=_int(raw, "prompt_tokens_details", "cached_tokens"),
                 reasoning_tokens=_int(raw, "completion_tokens_details", "reasoning_tokens"))


def _responses_usage(raw: dict) -> Usage:
    return Usage(input_tokens=_int(raw, "input_tokens"), output_tokens=_int(raw, "output_tokens"),
                 cached_tokens=_int(raw, "input_tokens_details", "cached_tokens"),
                 reasoning_tokens=_int(raw, "output_tokens_details", "reasoning_tokens"))


def _messages_usage(raw: dict) -> Usage:
    # Anthropic's input_tokens leaves out cache reads and writes; they are billed apart.
    written = _int(raw, "cache_creation_input_tokens")
    one_hour = _int(raw, "cache_creation", "ephemeral_1h_input_tokens")
    read = _int(raw, "cache_read_input_tokens")
    return Usage(input_tokens=_int(raw, "input_tokens") + written + read, output_tokens=_int(raw, "output_tokens"),
                 cached_tokens=read, cache_write_5m_tokens=max(0, written - one_hour),
                 cache_write_1h_tokens=min(one_hour, written))


def _gemini_usage(raw: dict) -> Usage:
    # Thoughts are billed as output but not counted in candidatesTokenCount; tool-use prompt
    # tokens are billed as input but not counted in promptTokenCount.
    thoughts = _int(raw, "thoughtsTokenCount")
    return Usage(input_tokens=_int(raw, "promptTokenCount") + _int(raw, "toolUsePromptTokenCount"),
                 output_tokens=_int(raw, "candidatesTokenCount") + thoughts,
                 cached_tokens=_int(raw, "cachedContentTokenCount"), reasoning_tokens=thoughts)


# -- the upstream request -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What names the upstream resource of a call."""

    upstream_model: str
    version: str = "v1beta"  # Gemini's API version, from the route
    method: str = ""  # Gemini's method: generateContent or streamGenerateContent


def _bearer(headers: dict[str, str], key: str) -> None:
    headers["authorization"] = f"Bearer {key}"


def _anthropic_key(headers: dict[str, str], key: str) -> None:
    headers["x-api-key"] = key
    headers.setdefault("anthropic-version", ANTHROPIC_VERSION)


def _google_key(headers: dict[str, str], key: str) -> None:
    headers["x-goog-api-key"] = key


# How each provider format takes its key: the client's own credential headers never go upstream.
PROVIDER_AUTH: dict[str, Callable[[dict[str, str], str], None]] = {
    "openai": _bearer, "anthropic": _anthropic_key, "gemini": _google_key,
}


def _openai_not_found(name: str, version: str) -> str:
    return f"The model `{name}` does not exist or you do not have access to it."


# -- the table ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    api: str  # the name the catalog's `api`/`apis` and the usage records use
    label: str  # for people (the dashboard's models page)
    family: str  # the error shape of the gateway's own errors (app.core.errors)
    provider_format: str  # the provider format that serves it
    paths: tuple[str, ...]  # POST paths served (also under /llm-api), the model in the body
    upstream_path: Callable[[Target], str]  # appended to the provider's base_url
    max_output: Callable[[Mapping], int | None]  # the request's output limit (raises a 400 for a bad one)
    usage_field: str  # where a whole answer reports its usage
    normalize: Callable[[dict], Usage]  # that usage, in one shape
    meter: Callable[[], meters.Meter]  # follows its event stream
    body_text: frozenset[str]  # keys of a whole answer's generated text
    not_found: Callable[[str, str], str] = _openai_not_found  # (model, version) -> the 404's message
    # Gemini: the model and method come in the path after these prefixes, each with its API version.
    path_prefixes: tuple[tuple[str, str], ...] = ()
    # Chat Completions: a stream reports usage only if asked; the gateway asks, and this meter
    # meters the usage chunk and takes it out of what the client gets.
    strip_meter: Callable[[], meters.ChatStripMeter] | None = None
    # Dashboard: what clients configure as their base URL, and the endpoints they call.
    base_path: str = API_PREFIX + "/v1"
    endpoint: str = ""
    examples: str = ""
    array_meter: Callable[[], meters.Meter] | None = None  # Gemini: its stream without alt=sse
    methods: tuple[str, ...] = ()  # Gemini: the methods after `{model}:` it serves
    stream_method: str = ""  # Gemini: the method that streams (others say so in the body)

    @property
    def model_in_path(self) -> bool:
        return bool(self.path_prefixes)

    @property
    def asks_for_usage(self) -> bool:
        return self.strip_meter is not None

    def streams(self, body: Mapping, method: str) -> bool:
        """Whether the client asked for a stream."""
        return method == self.stream_method if self.model_in_path else flag(body, "stream")


FORMATS: dict[str, Format] = {format_.api: format_ for format_ in (
    Format(
        api=CHAT, label="OpenAI Chat Completions", family=OPENAI, provider_format="openai",
        # Also under the Responses base URL: clients set up for GPT-5 on it call chat completions there too.
        paths=("/v1/chat/completions", "/api.openai.com/v1/chat/completions"),
        upstream_path=lambda target: "/chat/completions", max_output=_chat_max_output,
        usage_field="usage", normalize=_chat_usage, meter=meters.ChatMeter,
        body_text=frozenset({"content", "reasoning_content", "reasoning", "refusal", "arguments"}),
        strip_meter=meters.ChatStripMeter, base_path=API_PREFIX + "/v1", endpoint="POST /v1/chat/completions",
        examples="GPT-4o, Qwen, DeepSeek, GLM"),
    Format(
        api=RESPONSES, label="OpenAI Responses", family=OPENAI, provider_format="openai",
        paths=("/v1/responses", "/api.openai.com/v1/responses"),
        upstream_path=lambda target: "/responses", max_output=_responses_max_output,
        usage_field="usage", normalize=_responses_usage, meter=meters.ResponsesMeter,
        body_text=frozenset({"text", "arguments"}),
        base_path=API_PREFIX + "/api.openai.com/v1", endpoint="POST /v1/responses", examples="GPT-5.x"),
    Format(
        api=MESSAGES, label="Anthropic Messages", family=ANTHROPIC, provider_format="anthropic",
        paths=("/v1/messages", "/anthropic/v1/messages"),
        upstream_path=lambda target: "/v1/messages", max_output=_messages_max_output,
        usage_field="usage", normalize=_messages_usage, meter=meters.MessagesMeter,
        body_text=frozenset({"text", "thinking"}), not_found=lambda name, version: f"model: {name}",
        base_path=API_PREFIX + "/anthropic", endpoint="POST /v1/messages", examples="Claude"),
    Format(
        api=GEMINI, label="Gemini", family=GEMINI_FAMILY, provider_format="gemini", paths=(),
        path_prefixes=(("/v1beta/models/", "v1beta"), ("/v1/models/", "v1")),
        upstream_path=lambda t: f"/{t.version}/models/{quote(t.upstream_model, safe='')}:{t.method}",
        max_output=_gemini_max_output, usage_field="usageMetadata", normalize=_gemini_usage,
        meter=meters.GeminiSSEMeter, array_meter=meters.GeminiArrayMeter, body_text=frozenset({"text"}),
        not_found=lambda name, version: (f"models/{name} is not found for API version {version}, "
                                         "or is not offered by this gateway."),
        methods=("generateContent", "streamGenerateContent"), stream_method="streamGenerateContent",
        base_path=API_PREFIX, examples="Gemini",
        endpoint="POST /v1beta/models/{model}:generateContent, :streamGenerateContent"),
)}


def read_answer(format_: Format, body: bytes) -> tuple[dict | None, int]:
    """The raw usage object of a whole JSON answer, or None and the bytes of generated text in
    it (counted only then: the text is for an estimate, which a reported usage makes needless)."""
    try:
        obj = meters.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, 0
    if not isinstance(obj, dict):
        return None, 0
    raw = obj.get(format_.usage_field)
    if isinstance(raw, dict):
        return raw, 0
    return None, meters.text_bytes(obj, format_.body_text)


def stream_meter(format_: Format, *, sse: bool) -> meters.Meter:
    """The meter for an answer streamed in `format_`: `sse` for an event stream, else Gemini's
    JSON array."""
    if not sse and format_.array_meter is not None:
        return format_.array_meter()
    return format_.meter()


def check(catalog: Catalog, formats: Mapping[str, Format] = FORMATS) -> None:
    """Each LLM model's api must be a format this gateway serves, of every channel's provider's format."""
    for model in catalog.models.values():
        if model.is_image:
            continue
        for api in model.apis:
            format_ = formats.get(api)
            if format_ is None:
                raise CatalogError(f"model {model.name!r}: api {api!r} is not one of image, {', '.join(formats)}")
            for channel in model.channels:
                if channel.provider.format != format_.provider_format:
                    raise CatalogError(f"model {model.name!r}: api {api!r} needs a provider of format "
                                       f"{format_.provider_format!r}, but {channel.provider.name!r} is "
                                       f"{channel.provider.format!r}")
