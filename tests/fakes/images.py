"""A loopback fake of the OpenAI Images API and Gemini's generateContent for image models.

It speaks the real wire formats. Behaviour is chosen by markers in the prompt,
so tests running side by side don't step on each other:

    [status:500]   answer that status with the provider's error JSON
    [flaky:N]      answer 503 to the first N calls with this prompt, then succeed
    [sleep:S]      wait S seconds before answering
    [hold:N]       wait (up to 60 s) until N calls are in flight at once, then go on
    [noimage]      a well-formed answer with no image in it
    [garbage]      an "image" that does not decode
    [blocked]      the provider refuses the prompt (content policy / promptFeedback)
    [dims:WxH]     answer with an image of W x H pixels
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
from collections import Counter

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

OPENAI_SIZES = {"1024x1024": (1024, 1024), "1536x1024": (1536, 1024), "1024x1536": (1024, 1536), "auto": (1024, 1024)}
GEMINI_1K = {"1:1": (1024, 1024), "16:9": (1344, 768), "9:16": (768, 1344), "3:2": (1248, 832),
             "2:3": (832, 1248), "4:3": (1184, 864), "3:4": (864, 1184), "5:4": (1152, 896),
             "4:5": (896, 1152), "21:9": (1536, 672), "2:1": (1408, 704), "1:2": (704, 1408), "9:21": (672, 1536)}


def png(width: int, height: int, seed: str = "") -> bytes:
    color = tuple(hash(seed + str(i)) % 256 for i in range(3))
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG", compress_level=1)
    return out.getvalue()


def _marker(prompt: str, name: str) -> str | None:
    match = re.search(r"\[" + name + r"(?::([^\]]+))?\]", prompt)
    if not match:
        return None
    return match.group(1) or ""


class FakeImageUpstream:
    def __init__(self):
        self.calls: list[dict] = []
        self.per_prompt = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.app = Starlette(routes=[
            Route("/openai/v1/images/generations", self.openai_generations, methods=["POST"]),
            Route("/openai/v1/images/edits", self.openai_edits, methods=["POST"]),
            Route("/gemini/v1beta/models/{rest:path}", self.gemini, methods=["POST"]),
            Route("/files/{name}", self.reference_file, methods=["GET"]),
        ])

    def reset_peak(self) -> None:
        with self._lock:
            self.max_in_flight = self.in_flight

    def count(self, prompt_fragment: str) -> int:
        return sum(1 for call in self.calls if prompt_fragment in call["prompt"])

    async def _behave(self, prompt: str, call: dict):
        """Common markers; returns (status, error message) for an error answer, or None."""
        with self._lock:
            self.calls.append(call)
            self.per_prompt[prompt] += 1
            seen = self.per_prompt[prompt]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            hold = _marker(prompt, "hold")
            if hold:
                deadline = asyncio.get_running_loop().time() + 60
                while self.in_flight < int(hold) and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.05)
            sleep = _marker(prompt, "sleep")
            if sleep:
                await asyncio.sleep(float(sleep))
        finally:
            with self._lock:
                self.in_flight -= 1
        status = _marker(prompt, "status")
        if status:
            return int(status), f"fake upstream error {status}"
        flaky = _marker(prompt, "flaky")
        if flaky and seen <= int(flaky):
            return 503, "fake upstream is overloaded"
        return None

    def _image_bytes(self, prompt: str, default: tuple[int, int]) -> bytes:
        if _marker(prompt, "garbage") is not None:
            return b"this is not an image at all"
        dims = _marker(prompt, "dims")
        width, height = (int(v) for v in dims.split("x")) if dims else default
        return png(width, height, prompt)

    # Reference images: GET /files/{name}; "flaky-N-..." answers 503 N times first ----------
    async def reference_file(self, request: Request):
        from starlette.responses import Response

        name = request.path_params["name"]
        with self._lock:
            self.per_prompt["GET " + name] += 1
            seen = self.per_prompt["GET " + name]
        match = re.match(r"flaky-(\d+)-", name)
        if match and seen <= int(match.group(1)):
            return Response("busy", status_code=503)
        return Response(png(32, 24, name), media_type="image/png")

    # OpenAI ---------------------------------------------------------------
    async def openai_generations(self, request: Request) -> JSONResponse:
        body = await request.json()
        return await self._openai(body, [], request)

    async def openai_edits(self, request: Request) -> JSONResponse:
        async with request.form() as form:
            images = [await f.read() for f in form.getlist("image[]")]
            body = {k: v for k, v in form.items() if isinstance(v, str)}
        return await self._openai(body, images, request)

    async def _openai(self, body: dict, images: list[bytes], request: Request) -> JSONResponse:
        prompt = body.get("prompt", "")
        call = {"api": "openai", "path": request.url.path, "prompt": prompt, "body": body, "images": images,
                "authorization": request.headers.get("authorization")}
        error = await self._behave(prompt, call)
        if error:
            return JSONResponse({"error": {"message": error[1], "type": "server_error", "param": None,
                                           "code": None}}, status_code=error[0])
        if _marker(prompt, "blocked") is not None:
            return JSONResponse({"error": {"message": "Your request was rejected by the safety system.",
                                           "type": "image_generation_user_error", "param": None,
                                           "code": "moderation_blocked"}}, status_code=400)
        if _marker(prompt, "noimage") is not None:
            return JSONResponse({"created": 1, "data": []})
        data = self._image_bytes(prompt, OPENAI_SIZES.get(body.get("size", "auto"), (1024, 1024)))
        return JSONResponse({"created": 1713833628, "data": [{"b64_json": base64.b64encode(data).decode()}],
                             "usage": {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50}})

    # Gemini ---------------------------------------------------------------
    async def gemini(self, request: Request) -> JSONResponse:
        model, _, method = request.path_params["rest"].partition(":")
        body = await request.json()
        parts = body["contents"][0]["parts"]
        prompt = next((p["text"] for p in parts if "text" in p), "")
        call = {"api": "gemini", "model": model, "method": method, "prompt": prompt, "body": body,
                "api_key": request.headers.get("x-goog-api-key")}
        error = await self._behave(prompt, call)
        if error:
            return JSONResponse({"error": {"code": error[0], "message": error[1], "status": "UNAVAILABLE"}},
                                status_code=error[0])
        if _marker(prompt, "blocked") is not None:
            return JSONResponse({"promptFeedback": {"blockReason": "SAFETY"},
                                 "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}})
        if _marker(prompt, "noimage") is not None:
            return JSONResponse({"candidates": [{"content": {"role": "model", "parts": [
                {"text": "I can't draw that, but here is a poem instead."}]}, "finishReason": "STOP"}]})
        config = body.get("generationConfig", {}).get("imageConfig", {})
        width, height = GEMINI_1K.get(config.get("aspectRatio", "1:1"), (1024, 1024))
        data = self._image_bytes(prompt, (width, height))
        return JSONResponse({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "Here is your image."},
                {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(data).decode()}},
            ]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1290, "totalTokenCount": 1300},
            "modelVersion": model,
        })
