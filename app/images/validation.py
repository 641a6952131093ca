"""Parse and check a `POST /v1/images/generations` body; every violation names its `param`."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass, field
from typing import overload

from PIL import Image

from app.core import params
from app.core.catalog import RESOLUTIONS, SIZES, SIZES_4K, Catalog, Model
from app.core.errors import APIError, invalid

MAX_PROMPT = 32_000
MAX_IMAGE_URLS = 16
MAX_URL_LENGTH = 2048
ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# Pillow refuses images above this many pixels (its decompression-bomb guard, made an error).
MAX_PIXELS = 64_000_000
_FIELDS = {"model", "prompt", "size", "resolution", "n", "image_urls", "webhook_url"}
_DATA_URI = re.compile(r"^data:(image/(?:png|jpeg|jpg|webp));base64,(.*)$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class GenerationRequest:
    model: Model
    prompt: str
    size: str
    resolution: str
    n: int = 1
    image_urls: list[str] = field(default_factory=list)
    webhook_url: str | None = None


@overload
def _string(body: dict, name: str, default: str) -> str: ...
@overload
def _string(body: dict, name: str, default: None = None) -> str | None: ...
def _string(body: dict, name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:  # absent or null: SDKs send null for parameters left unset
        return default
    if not isinstance(value, str):
        raise invalid(name, f"'{name}' must be a string.", "invalid_type")
    return params.text(value, name)


def _http_url(value: str, param: str) -> str:
    params.http_url(params.text(value, param), param, max_length=MAX_URL_LENGTH)
    return value


def parse(body: object, catalog: Catalog) -> tuple[GenerationRequest, list[int]]:
    """The request, and the indexes of `image_urls` that are data URIs (checked by `verify_data_uri`)."""
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.", "invalid_json")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise invalid(unknown[0], f"Unknown parameter: '{unknown[0]}'.", "unknown_parameter")

    name = _string(body, "model")
    if not name:
        raise invalid("model", "'model' is required.", "missing_required_parameter")
    model = catalog.get(name, "image")
    if model is None:
        offered = ", ".join(m.name for m in catalog.of_api("image")) or "none"
        raise invalid("model", f"'{name}' is not an image model here. Image models: {offered}.", "model_not_found")

    prompt = _string(body, "prompt")
    if prompt is None or not prompt.strip():
        raise invalid("prompt", "'prompt' is required and must not be empty.", "missing_required_parameter")
    if len(prompt) > MAX_PROMPT:
        raise invalid("prompt", f"'prompt' is longer than {MAX_PROMPT} characters.", "string_too_long")

    resolution = _string(body, "resolution", "1k").lower()
    if resolution not in RESOLUTIONS:
        raise invalid("resolution", f"'resolution' must be one of: {', '.join(RESOLUTIONS)}.")
    if resolution not in model.resolutions:
        raise invalid("resolution", f"{model.name} supports resolution {', '.join(model.resolutions)}.")

    size = _string(body, "size", "1:1")
    if size not in SIZES:
        raise invalid("size", f"'size' must be an aspect ratio, one of: {', '.join(SIZES)}.")
    if resolution == "4k" and size not in SIZES_4K:
        raise invalid("size", f"4k is only available for sizes {', '.join(SIZES_4K)}.")
    allowed = model.allowed_sizes(resolution)
    if size not in allowed:
        raise invalid("size", f"{model.name} at {resolution} supports sizes {', '.join(allowed) or 'none'}.")

    n = 1 if body.get("n") is None else body["n"]
    if not isinstance(n, int) or isinstance(n, bool):
        raise invalid("n", "'n' must be an integer.", "invalid_type")
    if n != 1:
        raise invalid("n", "Only n=1 is supported.")

    image_urls = body.get("image_urls", [])
    if image_urls is None:
        image_urls = []
    if not isinstance(image_urls, list) or not all(isinstance(u, str) for u in image_urls):
        raise invalid("image_urls", "'image_urls' must be an array of strings.", "invalid_type")
    if len(image_urls) > MAX_IMAGE_URLS:
        raise invalid("image_urls", f"At most {MAX_IMAGE_URLS} reference images.")
    data_uris = []
    for index, url in enumerate(image_urls):
        params.text(url, f"image_urls[{index}]")
        if url[:5].lower() == "data:":
            data_uris.append(index)
        else:
            _http_url(url, f"image_urls[{index}]")

    webhook_url = _string(body, "webhook_url")
    if webhook_url is not None:
        webhook_url = _http_url(webhook_url, "webhook_url")

    request = GenerationRequest(model, prompt, size, resolution, n, list(image_urls), webhook_url)
    return request, data_uris


def fingerprint(request: GenerationRequest) -> dict:
    """What a validated request asks for, defaults filled in: two bodies that differ only in how
    they say it (`"size": null`, `"size": "1:1"` or no size) have the same fingerprint."""
    return {"model": request.model.name, "prompt": request.prompt, "size": request.size,
            "resolution": request.resolution, "n": request.n, "image_urls": request.image_urls,
            "webhook_url": request.webhook_url}


def outbound_urls(request: GenerationRequest) -> list[tuple[str, str]]:
    """(param, url) of every URL a worker will fetch or post to: the SSRF check's input."""
    pairs = [(f"image_urls[{i}]", url) for i, url in enumerate(request.image_urls) if url[:5].lower() != "data:"]
    if request.webhook_url:
        pairs.append(("webhook_url", request.webhook_url))
    return pairs


def decode_data_uri(value: str, param: str, max_bytes: int) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 image data URI, or a 400 naming `param`."""
    match = _DATA_URI.match(value)
    if not match:
        raise invalid(param, f"'{param}' must be a base64 data URI of a PNG, JPEG or WebP image.")
    if len(match.group(2)) > (max_bytes * 4) // 3 + 4:
        raise invalid(param, f"'{param}' is larger than {max_bytes // (1024 * 1024)} MiB.")
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(param, f"'{param}' is not valid base64.") from None
    return match.group(1).lower(), data


def verify_image(data: bytes, param: str) -> str:
    """Check that `data` is a whole PNG, JPEG or WebP image; returns its MIME type."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise invalid(param, f"'{param}' has more than {MAX_PIXELS} pixels.")
                image.verify()
                # Opened with formats=ALLOWED_FORMATS: its format is one of them (None is for images made in memory).
                return ALLOWED_FORMATS[image.format or ""]
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise invalid(param, f"'{param}' is too large an image.") from None
    except Exception:
        raise invalid(param, f"'{param}' is not a readable PNG, JPEG or WebP image.") from None


def verify_data_uris(request: GenerationRequest, indexes: list[int], max_bytes: int) -> None:
    """Decode and verify the data URIs of `image_urls` (CPU work: call it off the event loop)."""
    for index in indexes:
        param = f"image_urls[{index}]"
        _, data = decode_data_uri(request.image_urls[index], param, max_bytes)
        verify_image(data, param)
