"""The models and pricing page: what the catalog offers and where each API format is served."""

from __future__ import annotations

from decimal import Decimal

from app.core import money
from app.core.catalog import Catalog, Model
from app.core.errors import API_PREFIX
from app.proxy.formats import FORMATS as LLM_FORMATS

IMAGES = ("image", "Images (asynchronous tasks)", "gpt-image-2, Gemini image models", API_PREFIX + "/v1",
          "POST /v1/images/generations, GET /v1/tasks/{task_id}")


def formats() -> list[tuple[str, str, str, str, str]]:
    """(api, label, examples, base path clients configure, endpoint(s) they call): the LLM API
    formats of app.proxy.formats, then the image API."""
    return [*((f.api, f.label, f.examples, f.base_path, f.endpoint) for f in LLM_FORMATS.values()),
            IMAGES]


def price(units: int | None) -> str:
    """A catalog price as written, with at least cents: 2_500_000_000 -> "$2.50", 75_000_000 -> "$0.075"."""
    if units is None:
        return ""
    value = money.to_decimal(units).normalize()
    exponent = value.as_tuple().exponent  # an int: an amount is finite (not NaN or infinite)
    if value == value.to_integral_value() or (isinstance(exponent, int) and -exponent < 2):
        value = value.quantize(Decimal("0.01"))
    return f"${value}"


def base_urls(public_url: str) -> list[dict]:
    """The base-URL table per format, built from this server's public URL."""
    return [{"api": api, "label": label, "examples": examples, "base_url": public_url.rstrip("/") + path,
             "endpoint": endpoint} for api, label, examples, path, endpoint in formats()]


def _row(model: Model, api: str, by_api: dict[str, tuple]) -> dict:
    _, label, _, path, endpoint = by_api[api]
    row = {"name": model.name, "kind": "Image" if model.is_image else "LLM", "api": api,
           "format": label, "base_path": path, "endpoint": endpoint.replace("{model}", model.name),
           "description": model.description}
    if model.is_image:
        row["prices"] = [(res, price(model.prices[res])) for res in model.resolutions]
        row["sizes"] = ", ".join(model.sizes)
    else:
        row.update(input=price(model.input_per_mtok), output=price(model.output_per_mtok),
                   cached=price(model.cached_input_per_mtok), max_output_tokens=model.max_output_tokens)
    return row


def models(catalog: Catalog) -> dict[str, list[dict]]:
    """Every model the catalog offers (any account may use any of them), LLMs and image models
    apart: a row per model and API it is offered on."""
    by_api = {row[0]: row for row in formats()}
    order = {api: index for index, api in enumerate(by_api)}
    offered = [(model, api) for model in catalog.models.values() for api in model.apis if api in by_api]
    rows = [_row(model, api, by_api) for model, api in sorted(offered, key=lambda pair: (order[pair[1]], pair[0].name))]
    return {"llm": [r for r in rows if r["api"] != "image"], "image": [r for r in rows if r["api"] == "image"]}
