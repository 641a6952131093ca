"""Gemini image models: POST {base_url}/v1beta/models/{model}:generateContent.

Asks for IMAGE output with `imageConfig {aspectRatio, imageSize}`; reference
images go as `inline_data` parts; the image comes back as an `inlineData` part.
A reply with no image part is a failure.
"""

from __future__ import annotations

import base64
import binascii

import httpx

from app.core.catalog import Provider
from workers.backends.base import ImageJob, PermanentError, http_error, status_error

BLOCKED_FINISH = {"SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "RECITATION", "SPII",
                  "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"}


def request_body(job: ImageJob) -> dict:
    parts: list[dict] = [{"text": job.prompt}]
    for ref in job.references:
        parts.append({"inline_data": {"mime_type": ref.mime_type, "data": base64.b64encode(ref.data).decode()}})
    image_config = {"imageSize": job.resolution.upper()}
    if job.size != "auto":
        image_config["aspectRatio"] = job.size
    return {
        "contents": [{"role": "user", "parts": parts}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": image_config},
    }


class GeminiBackend:
    def __init__(self, provider: Provider, http: httpx.Client) -> None:
        self.provider = provider
        self.http = http
        self.headers = {"x-goog-api-key": provider.api_key} if provider.api_key else {}

    def generate(self, job: ImageJob) -> list[bytes]:
        url = f"{self.provider.base_url}/v1beta/models/{job.upstream_model}:generateContent"
        try:
            response = self.http.post(url, json=request_body(job), headers=self.headers,
                                      timeout=self.provider.timeout or httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise http_error(exc) from None
        if response.status_code != 200:
            raise status_error(response, "Gemini", self.provider.api_key)
        try:
            reply = response.json()
        except ValueError:
            raise PermanentError("bad_response", "Gemini answered with something that is not JSON.") from None
        block = (reply.get("promptFeedback") or {}).get("blockReason")
        if block:
            raise PermanentError("content_blocked", f"Gemini refused the prompt ({block}).")
        images, finish, text = [], None, []
        for candidate in reply.get("candidates") or []:
            finish = candidate.get("finishReason") or finish
            for part in (candidate.get("content") or {}).get("parts") or []:
                inline = part.get("inlineData") or part.get("inline_data")
                if inline and inline.get("data"):
                    try:
                        images.append(base64.b64decode(inline["data"], validate=True))
                    except (binascii.Error, ValueError):
                        raise PermanentError("bad_image", "Gemini returned image data that is not base64.") from None
                elif part.get("text"):
                    text.append(part["text"])
        if not images:
            if finish in BLOCKED_FINISH:
                raise PermanentError("content_blocked", f"Gemini refused to draw this ({finish}).")
            said = (" It said: " + " ".join(text)[:300]) if text else ""
            raise PermanentError("no_image", f"Gemini answered without an image (finishReason {finish}).{said}")
        return images
