"""Image backends, one module each behind one interface (base.ImageBackend)."""

from __future__ import annotations

import httpx

from app.core.catalog import Provider
from workers.backends.base import ImageBackend


def make_backend(provider: Provider, http: httpx.Client) -> ImageBackend:
    """The backend for a catalog provider, sharing the worker's HTTP connection pool."""
    if provider.format == "local":
        from workers.backends.local import LocalBackend

        return LocalBackend()
    if provider.format == "openai":
        from workers.backends.openai import OpenAIBackend

        return OpenAIBackend(provider, http)
    if provider.format == "gemini":
        from workers.backends.gemini import GeminiBackend

        return GeminiBackend(provider, http)
    raise ValueError(f"provider {provider.name!r} (format {provider.format}) has no image backend")
