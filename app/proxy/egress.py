"""Egress proxies for the passthrough's https upstreams: a CONNECT tunnel, then TLS through it.

The tunnel carries TLS end to end, so the proxy sees the upstream's name and
nothing else. Which upstreams go through it follows the variables the image
workers' httpx reads too: HTTPS_PROXY, and NO_PROXY for the hosts reached
directly (app.core.settings reads them).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # there, not in typeshed

MAX_REPLY = 65536


def proxy_for(base_url: str, https_proxy: str | None, no_proxy: str) -> str | None:
    """The egress proxy for an upstream: https ones only, and none for a host NO_PROXY names
    (its usual forms: `host`, `.domain`, `host:port`, `*`)."""
    parts = urlsplit(base_url)
    if not https_proxy or parts.scheme != "https":
        return None
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return None if no_proxy and proxy_bypass_environment(host, {"no": no_proxy}) else https_proxy


class EgressProxy:
    """`http://[user:password@]host:port`, asked to CONNECT to `target` (`host:port`)."""

    def __init__(self, url: str, target: str):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            # Not the URL itself: it may hold a password.
            raise ValueError(f"HTTPS_PROXY must be an http://host:port URL (a CONNECT proxy), not {parts.scheme}://...")
        self.host, self.port = parts.hostname, parts.port or 80
        self.target = target
        head = f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n"
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            head += f"proxy-authorization: Basic {base64.b64encode(credentials).decode()}\r\n"
        self.request = (head + "\r\n").encode("latin-1")

    async def connect(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol,
                      ssl_context: ssl.SSLContext, server_hostname: str) -> asyncio.Transport:
        """A TLS transport to the target through the proxy, delivering to `protocol`.
        Raises ConnectionError when the proxy refuses or breaks off, OSError when unreachable."""
        transport, reply = await loop.create_connection(lambda: _Reply(loop), self.host, self.port)
        try:
            transport.write(self.request)
            status_line = (await reply.head).split(b"\r\n", 1)[0]
            parts = status_line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].startswith(b"2"):
                raise ConnectionError(f"the egress proxy refused the tunnel to {self.target}: "
                                      f"{status_line.decode('latin-1')!r}")
            tls = await loop.start_tls(transport, protocol, ssl_context, server_hostname=server_hostname)
            if tls is None:  # only for a transport closing meanwhile
                raise ConnectionError(f"the tunnel to {self.target} closed before TLS began")
            return tls
        except BaseException:
            transport.close()
            raise


class _Reply(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT; TLS takes the connection over after it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.head = loop.create_future()
        self._data = b""

    def data_received(self, data: bytes) -> None:
        self._data += data
        if self.head.done():
            return
        if b"\r\n\r\n" in self._data:
            self.head.set_result(self._data)
        elif len(self._data) > MAX_REPLY:
            self.head.set_exception(ConnectionError("the egress proxy's answer is not HTTP"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("the egress proxy closed the connection before answering"))
