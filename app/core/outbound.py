"""Outbound URL safety (SSRF): webhook_url and image_urls may only reach public addresses.

Two checks, because a name can resolve differently between them (DNS rebinding):
- at submission, `check_public_url` resolves the host and refuses any address that
  is not public (400 naming the param);
- at connection time, `guarded_client` connects only to an address it has just
  resolved and checked itself, so what was checked is what is connected to.

`MEDIAGATE_ALLOW_PRIVATE_URLS=1` lifts both for local development and tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpcore
import httpx

from app.core.errors import invalid

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


class BlockedAddress(httpcore.ConnectError):
    """A connection to a non-public address was refused (httpx raises it as httpx.ConnectError)."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress | str) -> bool:
    """True only for a globally routable unicast address: not loopback, private, link-local,
    shared (100.64/10), reserved, multicast or unspecified, in IPv4 or IPv6."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 address itself
            return is_public(ip.ipv4_mapped)
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public(inner):
            return False
    if (ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_reserved
            or ip.is_unspecified):
        return False
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    return ip.is_global


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _default_port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


async def check_public_url(url: str, param: str) -> None:
    """400 naming `param` unless every address `url`'s host resolves to is public.

    Assumes `url` already passed the http(s) syntax check. The lookup runs in the
    event loop's resolver thread, not on the loop.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = _literal(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, _default_port(parts),
                                                                 type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise invalid(param, f"'{param}': the host {host!r} cannot be resolved.", "unsafe_url") from None
        addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        if not is_public(address):
            raise invalid(param, f"'{param}' points to a private or reserved address ({address}); "
                                 "only public addresses are allowed.", "unsafe_url")


async def check_public_urls(pairs: list[tuple[str, str]]) -> None:
    """`check_public_url` for each (param, url), the lookups side by side."""
    results = await asyncio.gather(*(check_public_url(url, param) for param, url in pairs),
                                   return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class GuardedBackend(httpcore.SyncBackend):
    """Resolves the host itself, refuses non-public addresses, and connects to the checked one.

    TLS still verifies the original host name: httpcore wraps this stream with
    server_hostname set to the URL's host, not to the address.
    """

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        literal = _literal(host)
        try:
            addresses = [str(literal)] if literal is not None else _resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from None
        allowed = [address for address in addresses if is_public(address)]
        if not allowed or len(allowed) != len(addresses):
            raise BlockedAddress(f"refused to connect to {host!r}: it resolves to a non-public address "
                                 f"({', '.join(a for a in addresses if a not in allowed)})")
        last: Exception | None = None
        for address in allowed:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # `allowed` is not empty, so the loop ran and each try failed
        raise last


def guarded_transport(**kwargs: Any) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport(**kwargs)
    # httpx has no public hook for the network backend; the pool passes this one to every
    # connection it makes (tests/webhooks/test_urls.py proves the refusal end to end).
    transport._pool._network_backend = GuardedBackend()  # noqa: SLF001
    return transport


def outbound_client(allow_private: bool, *, timeout: float, max_connections: int = 100) -> httpx.Client:
    """The client for user-supplied URLs (webhooks, reference images): guarded unless
    private addresses are allowed; never follows redirects itself and ignores proxy
    variables, so the connection goes where the check says."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections // 2)
    transport = httpx.HTTPTransport(limits=limits) if allow_private else guarded_transport(limits=limits)
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False)
