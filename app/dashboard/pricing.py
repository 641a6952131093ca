"""The models and pricing page: what the catalog offers and where each API format is served."""

from __future__ import annotations

from decimal import Decimal

from app import money
from app.catalog import Catalog, Model

# (api, label, examples, base path clients configure, endpoint(s) they call), as in the hosted docs.
FORMATS = (
    ("chat", "OpenAI Chat Completions", "GPT-4o, Qwen, DeepSeek, GLM", "/llm-api/v1",
     "POST /v1/chat/completions"),
    ("responses", "OpenAI Responses", "GPT-5.x", "/llm-api/api.openai.com/v1", "POST /v1/responses"),
    ("messages", "Anthropic Messages", "Claude", "/llm-api/anthropic", "POST /v1/messages"),
    ("gemini", "Gemini", "Gemini", "/llm-api",
     "POST /v1beta/models/{model}:generateContent, :streamGenerateContent"),
    ("image", "Images (asynchronous tasks)", "gpt-image-2, Gemini image models", "/llm-api/v1",
     "POST /v1/images/generations, GET /v1/tasks/{task_id}"),
)
_BY_API = {row[0]: row for row in FORMATS}
_ORDER = {row[0]: index for index, row in enumerate(FORMATS)}


def price(units: int | None) -> str:
    """A catalog price as written, with at least cents: 2_500_000_000 -> "$2.50", 75_000_000 -> "$0.075"."""
    if units is None:
        return ""
    value = money.to_decimal(units).normalize()
    if value == value.to_integral_value() or -value.as_tuple().exponent < 2:
        value = value.quantize(Decimal("0.01"))
    return f"${value}"


def base_urls(public_url: str) -> list[dict]:
    """The base-URL table per format, built from this server's public URL."""
    return [{"api": api, "label": label, "examples": examples, "base_url": public_url.rstrip("/") + path,
             "endpoint": endpoint} for api, label, examples, path, endpoint in FORMATS]


def _row(model: Model) -> dict:
    _, label, _, path, endpoint = _BY_API[model.api]
    row = {"name": model.name, "kind": "Image" if model.api == "image" else "LLM", "api": model.api,
           "format": label, "base_path": path, "endpoint": endpoint.replace("{model}", model.name),
           "description": model.description}
    if model.api == "image":
        row["prices"] = [(res, price(model.prices[res])) for res in model.resolutions]
        row["sizes"] = ", ".join(model.sizes)
    else:
        row.update(input=price(model.input_per_mtok), output=price(model.output_per_mtok),
                   cached=price(model.cached_input_per_mtok), max_output_tokens=model.max_output_tokens)
    return row


def models(catalog: Catalog) -> dict[str, list[dict]]:
    """Every model the catalog offers (any account may use any of them), LLMs and image models apart."""
    ordered = sorted(catalog.models.values(), key=lambda m: (_ORDER.get(m.api, 99), m.name))
    rows = [_row(model) for model in ordered if model.api in _BY_API]
    return {"llm": [r for r in rows if r["api"] != "image"], "image": [r for r in rows if r["api"] == "image"]}
