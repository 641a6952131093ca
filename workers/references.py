"""Reference images for image-to-image: data URIs decoded, URLs downloaded with caps, all verified.

Downloads go through the outbound client (app.core.outbound.outbound_client), which connects only
to public addresses; every redirect hop is a new request, so it is checked again.
"""

from __future__ import annotations

import time
from urllib.parse import urljoin

import httpx

from app.core.errors import APIError
from app.core.outbound import BlockedAddress
from app.images.validation import decode_data_uri, verify_image
from workers.backends.base import PermanentError, Reference, TransientError

MAX_REDIRECTS = 3
FETCH_TIMEOUT = 20.0


def _download(http: httpx.Client, url: str, max_bytes: int, param: str) -> bytes:
    deadline = time.monotonic() + FETCH_TIMEOUT  # in total, so a slow trickle cannot hold a worker
    for _ in range(MAX_REDIRECTS + 1):
        try:
            with http.stream("GET", url, timeout=FETCH_TIMEOUT, follow_redirects=False) as response:
                if response.is_redirect and response.headers.get("location"):
                    url = urljoin(url, response.headers["location"])
                    if not url.startswith(("http://", "https://")):
                        raise PermanentError("bad_reference_image", f"{param} redirects to a non-http URL.")
                    continue
                if response.status_code >= 400:
                    error = TransientError if response.status_code >= 500 or response.status_code == 429 \
                        else PermanentError
                    raise error("bad_reference_image", f"{param}: download answered {response.status_code}.")
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    if time.monotonic() > deadline:
                        raise TransientError("bad_reference_image",
                                             f"{param}: download took longer than {FETCH_TIMEOUT:g}s.")
                    total += len(chunk)
                    if total > max_bytes:
                        raise PermanentError("bad_reference_image",
                                             f"{param} is larger than {max_bytes // (1024 * 1024)} MiB.")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            if isinstance(exc.__cause__, BlockedAddress):
                raise PermanentError("bad_reference_image",
                                     f"{param} leads to a private or reserved address.") from None
            raise TransientError("bad_reference_image", f"{param}: download failed ({type(exc).__name__}).") from None
    raise PermanentError("bad_reference_image", f"{param}: too many redirects.")


def resolve(image_urls: list[str], http: httpx.Client, max_bytes: int) -> list[Reference]:
    references = []
    for index, url in enumerate(image_urls):
        param = f"image_urls[{index}]"
        try:
            if url[:5].lower() == "data:":
                _, data = decode_data_uri(url, param, max_bytes)
            else:
                data = _download(http, url, max_bytes, param)
            mime = verify_image(data, param)
        except APIError as exc:
            raise PermanentError("bad_reference_image", exc.message) from None
        references.append(Reference(mime, data))
    return references
