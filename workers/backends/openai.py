"""OpenAI Images API: POST {base_url}/images/generations, or /images/edits (multipart) with references.

Reads `b64_json` (gpt-image models) or downloads `url` (older models).
"""

from __future__ import annotations

import base64
import binascii

import httpx

from app.core.catalog import Provider
from workers.backends.base import ImageJob, PermanentError, http_error, status_error


def openai_size(job: ImageJob) -> str:
    """The nearest size the Images API takes; the worker crops and resizes to the exact table size."""
    if job.size == "auto":
        return "auto"
    if job.width > job.height:
        return "1536x1024"
    if job.height > job.width:
        return "1024x1536"
    return "1024x1024"


class OpenAIBackend:
    def __init__(self, provider: Provider, http: httpx.Client) -> None:
        self.provider = provider
        self.http = http
        self.headers = {"Authorization": f"Bearer {provider.api_key}"} if provider.api_key else {}

    def generate(self, job: ImageJob) -> list[bytes]:
        fields = {"model": job.upstream_model, "prompt": job.prompt, "n": 1, "size": openai_size(job)}
        timeout = self.provider.timeout or httpx.USE_CLIENT_DEFAULT
        try:
            if job.references:
                files = [("image[]", (f"reference-{i}.{ref.mime_type.split('/')[1]}", ref.data, ref.mime_type))
                         for i, ref in enumerate(job.references)]
                data = {k: str(v) for k, v in fields.items()}
                response = self.http.post(f"{self.provider.base_url}/images/edits", data=data, files=files,
                                          headers=self.headers, timeout=timeout)
            else:
                response = self.http.post(f"{self.provider.base_url}/images/generations", json=fields,
                                          headers=self.headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise http_error(exc) from None
        if response.status_code != 200:
            raise status_error(response, "OpenAI", self.provider.api_key)
        try:
            items = response.json().get("data") or []
        except ValueError:
            raise PermanentError("bad_response", "OpenAI answered with something that is not JSON.") from None
        return [self._image(item) for item in items if isinstance(item, dict) and (item.get("b64_json")
                                                                                   or item.get("url"))]

    def _image(self, item: dict) -> bytes:
        if item.get("b64_json"):
            try:
                return base64.b64decode(item["b64_json"], validate=True)
            except (binascii.Error, ValueError):
                raise PermanentError("bad_image", "OpenAI returned b64_json that is not base64.") from None
        try:
            response = self.http.get(item["url"], follow_redirects=True)
        except httpx.HTTPError as exc:
            raise http_error(exc) from None
        if response.status_code != 200:
            raise status_error(response, "OpenAI image download", self.provider.api_key)
        return response.content
