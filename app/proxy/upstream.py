"""Where a call goes and which headers cross the gateway, each way.

The client's `llm_` key never leaves: every credential header the client sent
is dropped and the provider's key from the catalog is set the provider's way.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlencode

from app.core.catalog import Provider
from app.proxy.formats import PROVIDER_AUTH, Format, Target

# Not forwarded upstream: hop-by-hop headers, the client's credentials, what
# the client sets itself (host, framing), and headers that name the client's own provider account.
_DROP_REQUEST = frozenset({
    "host", "content-length", "connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect", "cookie",
    "authorization", "x-api-key", "x-goog-api-key", "accept-encoding",
    "openai-organization", "openai-project", "x-goog-user-project",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
})
# Not passed back: hop-by-hop headers, framing the ASGI server redoes, headers
# the server sets itself, and ones that identify the gateway's provider account.
_DROP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"content-encoding", b"date", b"server",
    b"set-cookie", b"alt-svc", b"via", b"openai-organization", b"openai-project",
    b"anthropic-organization-id", b"x-goog-user-project",
})


def url(provider: Provider, format_: Format, target: Target, query: Sequence[tuple[str, str]] = ()) -> str:
    """The upstream URL of a call; `query` is the client's, less its `key`."""
    path = f"{provider.base_url}{format_.upstream_path(target)}"
    params = [(k, v) for k, v in query if k != "key"]
    return f"{path}?{urlencode(params)}" if params else path


def request_headers(client: dict[str, str], provider: Provider, key: str) -> dict[str, str]:
    """The client's headers (lower-case names) as they go upstream, with the provider's `key`."""
    headers = {name: value for name, value in client.items() if name not in _DROP_REQUEST}
    # Identity: the bytes the client gets are the bytes the meter reads.
    headers["accept-encoding"] = "identity"
    PROVIDER_AUTH[provider.format](headers, key)
    return headers


def response_headers(raw: Sequence[tuple[bytes, bytes]], request_id: str) -> list[tuple[bytes, bytes]]:
    """The upstream's headers as they go back (content type, request ids, rate limits, ...)."""
    out = [(name.lower(), value) for name, value in raw if name.lower() not in _DROP_RESPONSE]
    out.append((b"x-mediagate-request-id", request_id.encode()))
    return out
