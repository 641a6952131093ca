"""Providers and models, from a TOML file validated at startup.

`MEDIAGATE_CATALOG` names the file; without it the built-in catalog
(app/core/catalog_builtin.toml) offers the `local` image model and every real
provider whose key variable is set. Prices are parsed as decimals, never floats.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from app.core import money

SIZES = ("auto", "1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "5:4", "4:5", "2:1", "1:2", "21:9", "9:21")
RESOLUTIONS = ("1k", "2k", "4k")
SIZES_4K = ("16:9", "9:16", "1:2", "2:1", "21:9", "9:21")
FORMATS = ("openai", "anthropic", "gemini", "local")
IMAGE = "image"  # the API of image models; LLM models name the API formats of app.proxy.formats
BUILTIN = Path(__file__).with_name("catalog_builtin.toml")

_PROVIDER_KEYS = {"format", "base_url", "api_key", "api_keys", "api_key_env", "api_keys_env", "timeout"}
_MODEL_KEYS = {
    "name", "provider", "channels", "api", "apis", "upstream_model", "prices", "sizes", "resolutions",
    "input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "max_output_tokens", "description",
}
_CHANNEL_KEYS = {"provider", "upstream_model", "priority", "weight"}


class CatalogError(Exception):
    """The catalog is wrong; the message names what and where."""


@dataclass(frozen=True)
class Provider:
    name: str
    format: str
    base_url: str
    # Its keys: calls rotate over them, and one refused (401, 403, 429) is cooled down like a channel.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    timeout: float | None = None

    @property
    def api_key(self) -> str | None:
        """The first key (image backends use one key; the LLM passthrough rotates over all)."""
        return self.api_keys[0] if self.api_keys else None


@dataclass(frozen=True)
class Channel:
    """One way to serve a model: a provider, and the model's name there. Tried in `priority`
    order (lower first); among channels of one priority, in proportion to `weight`."""

    provider: Provider
    upstream_model: str
    priority: int = 0
    weight: int = 1

    @property
    def name(self) -> str:
        """How records and operators name it: its provider (the cooldown key adds the upstream model)."""
        return self.provider.name


@dataclass(frozen=True)
class Model:
    name: str
    channels: tuple[Channel, ...]  # at least one, in priority order
    apis: tuple[str, ...]  # the APIs it is offered on: ("image",), or one or more LLM API formats
    prices: Mapping[str, int] = field(default_factory=dict)  # image: resolution -> units per image
    sizes: tuple[str, ...] = SIZES
    resolutions: tuple[str, ...] = RESOLUTIONS
    input_per_mtok: int = 0  # LLM: units per 1M tokens
    output_per_mtok: int = 0
    cached_input_per_mtok: int | None = None
    max_output_tokens: int | None = None
    description: str = ""

    @property
    def is_image(self) -> bool:
        return self.apis == (IMAGE,)

    @property
    def provider(self) -> Provider:
        """The first channel's provider (the one a single-channel model has)."""
        return self.channels[0].provider

    @property
    def upstream_model(self) -> str:
        return self.channels[0].upstream_model

    def allowed_sizes(self, resolution: str) -> tuple[str, ...]:
        if resolution == "4k":
            return tuple(s for s in self.sizes if s in SIZES_4K)
        return self.sizes


@dataclass(frozen=True)
class Catalog:
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]

    def get(self, name: str, api: str | tuple[str, ...]) -> Model | None:
        model = self.models.get(name)
        wanted = (api,) if isinstance(api, str) else api
        return model if model is not None and any(a in wanted for a in model.apis) else None

    def of_api(self, *apis: str) -> list[Model]:
        """The models offered on any of `apis`."""
        return [m for m in self.models.values() if any(a in apis for a in m.apis)]


def _price(value: Any, where: str) -> int:  # a value as TOML parsed it
    if isinstance(value, float):  # tomllib is told to parse floats as Decimal; belt and braces
        raise CatalogError(f"{where}: write prices as strings or decimals")
    try:
        units = money.from_usd(value)
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"{where}: {exc}") from None
    if units < 0:
        raise CatalogError(f"{where}: a price can't be negative")
    return units


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CatalogError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def parse(text: str, environ: Mapping[str, str], *, source: str = "catalog", skip_keyless: bool = False) -> Catalog:
    """Build a Catalog from TOML text. `skip_keyless` drops real providers with no key (built-in catalog)."""
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: {exc}") from None
    _check_keys(data, {"providers", "models"}, source)

    providers: dict[str, Provider] = {}
    for name, table in (data.get("providers") or {}).items():
        where = f"{source}: providers.{name}"
        _check_keys(table, _PROVIDER_KEYS, where)
        fmt = table.get("format")
        if fmt not in FORMATS:
            raise CatalogError(f"{where}: format must be one of {', '.join(FORMATS)}")
        api_keys = _api_keys(table, environ, where)
        if fmt != "local" and not api_keys and skip_keyless:
            continue
        base_url = str(table.get("base_url") or "").rstrip("/")
        if fmt != "local" and not base_url:
            raise CatalogError(f"{where}: base_url is required")
        timeout = table.get("timeout")
        providers[name] = Provider(name, fmt, base_url, api_keys, float(timeout) if timeout is not None else None)

    models: dict[str, Model] = {}
    for index, table in enumerate(data.get("models") or []):
        name = table.get("name")
        where = f"{source}: models[{index}]" + (f" ({name})" if name else "")
        _check_keys(table, _MODEL_KEYS, where)
        if not name:
            raise CatalogError(f"{where}: name is required")
        if name in models:
            raise CatalogError(f"{where}: model {name!r} is defined twice")
        channels = _channels(table, providers, where, name, skip_keyless=skip_keyless)
        if not channels:  # the built-in catalog: none of its providers has a key
            continue
        apis = _apis(table, where)
        common = dict(name=name, channels=channels, apis=apis, description=str(table.get("description") or ""))
        if apis == (IMAGE,):
            models[name] = _image_model(table, where, common)
        else:
            models[name] = _llm_model(table, where, common)
    return Catalog(providers=providers, models=models)


def _api_keys(table: dict, environ: Mapping[str, str], where: str) -> tuple[str, ...]:
    """`api_key`, `api_keys`, `api_key_env` or `api_keys_env` (one of them): the keys that are set."""
    given = [key for key in ("api_key", "api_keys", "api_key_env", "api_keys_env") if key in table]
    if len(given) > 1:
        raise CatalogError(f"{where}: give one of api_key, api_keys, api_key_env, api_keys_env, "
                           f"not {' and '.join(given)}")
    if not given:
        return ()
    value = table[given[0]]
    values = value if given[0].startswith("api_keys") else [value]
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise CatalogError(f"{where}: {given[0]} must be " + ("a list of strings" if given[0].startswith("api_keys")
                                                               else "a string"))
    if given[0].endswith("_env"):
        values = [environ.get(variable, "") for variable in values]
    return tuple(dict.fromkeys(v for v in values if v))


def _channels(table: dict, providers: Mapping[str, Provider], where: str, name: str, *,
              skip_keyless: bool) -> tuple[Channel, ...]:
    """`provider = "..."` (one channel) or `[[models.channels]]` tables, in priority order.
    With `skip_keyless` (the built-in catalog), channels of providers left out are dropped."""
    if "provider" in table and "channels" in table:
        raise CatalogError(f"{where}: give provider or channels, not both")
    default_model = table.get("upstream_model") or name
    raw = [{"provider": table["provider"]}] if "provider" in table else table.get("channels")
    if not isinstance(raw, list) or not raw:
        raise CatalogError(f"{where}: a model needs a provider, or channels ([[models.channels]] with a provider)")
    channels = []
    for index, entry in enumerate(raw):
        at = f"{where}: channels[{index}]" if "channels" in table else where
        if not isinstance(entry, dict):
            raise CatalogError(f"{at}: a channel is a table with a provider")
        _check_keys(entry, _CHANNEL_KEYS, at)
        provider_name = entry.get("provider")
        provider = providers.get(provider_name) if isinstance(provider_name, str) else None
        if provider is None:
            if skip_keyless:
                continue
            raise CatalogError(f"{at}: provider {provider_name!r} is not defined")
        priority, weight = entry.get("priority", 0), entry.get("weight", 1)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise CatalogError(f"{at}: priority must be a whole number (lower is tried first)")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
            raise CatalogError(f"{at}: weight must be a whole number of at least 1")
        channels.append(Channel(provider, str(entry.get("upstream_model") or default_model), priority, weight))
    return tuple(sorted(channels, key=lambda channel: channel.priority))


def _apis(table: dict, where: str) -> tuple[str, ...]:
    """`api = "chat"` or `apis = ["chat", "responses"]` (default: an image model). Which LLM
    API names exist, and which provider formats serve them, the passthrough checks at startup."""
    if "api" in table and "apis" in table:
        raise CatalogError(f"{where}: give api or apis, not both")
    apis = table.get("apis", [table.get("api", IMAGE)])
    if (not isinstance(apis, list) or not apis or not all(isinstance(a, str) and a for a in apis)
            or len(set(apis)) != len(apis)):
        raise CatalogError(f"{where}: apis must be a list of distinct API names, e.g. [\"chat\", \"responses\"]")
    if IMAGE in apis and len(apis) > 1:
        raise CatalogError(f"{where}: an image model is offered on the image API alone")
    return tuple(apis)


def _image_model(table: dict, where: str, common: dict) -> Model:
    for key in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "max_output_tokens"):
        if key in table:
            raise CatalogError(f"{where}: {key!r} is for LLM models, not image models")
    sizes = tuple(table.get("sizes") or SIZES)
    resolutions = tuple(table.get("resolutions") or RESOLUTIONS)
    for size in sizes:
        if size not in SIZES:
            raise CatalogError(f"{where}: unknown size {size!r}")
    for res in resolutions:
        if res not in RESOLUTIONS:
            raise CatalogError(f"{where}: unknown resolution {res!r}")
    raw_prices = table.get("prices")
    if not isinstance(raw_prices, dict) or not raw_prices:
        raise CatalogError(f"{where}: image models need prices, e.g. prices = {{ \"1k\" = \"0.012\" }}")
    prices = {}
    for res in resolutions:
        if res not in raw_prices:
            raise CatalogError(f"{where}: no price for resolution {res!r}")
        prices[res] = _price(raw_prices[res], f"{where}: prices.{res}")
    return Model(**common, prices=prices, sizes=sizes, resolutions=resolutions)


def _llm_model(table: dict, where: str, common: dict) -> Model:
    for key in ("prices", "sizes", "resolutions"):
        if key in table:
            raise CatalogError(f"{where}: {key!r} is for image models")
    for key in ("input_per_mtok", "output_per_mtok"):
        if key not in table:
            raise CatalogError(f"{where}: {key} is required (USD per 1M tokens)")
    cached = table.get("cached_input_per_mtok")
    max_out = table.get("max_output_tokens")
    if max_out is not None and (not isinstance(max_out, int) or max_out <= 0):
        raise CatalogError(f"{where}: max_output_tokens must be a positive integer")
    return Model(
        **common,
        input_per_mtok=_price(table["input_per_mtok"], f"{where}: input_per_mtok"),
        output_per_mtok=_price(table["output_per_mtok"], f"{where}: output_per_mtok"),
        cached_input_per_mtok=_price(cached, f"{where}: cached_input_per_mtok") if cached is not None else None,
        max_output_tokens=max_out,
    )


def load(path: Path | None, environ: Mapping[str, str]) -> Catalog:
    if path is None:
        return parse(BUILTIN.read_text(encoding="utf-8"), environ, source="built-in catalog", skip_keyless=True)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"catalog {path}: {exc.strerror}") from None
    return parse(text, environ, source=str(path))
