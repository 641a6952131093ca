"""Which upstreams go through the egress proxy (the tunnel itself: tests/proxy/test_client.py)."""

from __future__ import annotations

import pytest

from app.core.settings import Settings
from app.proxy.egress import EgressProxy, proxy_for


def test_the_egress_proxy_is_for_https_upstreams_not_named_in_no_proxy():
    settings = Settings.from_env({"https_proxy": "http://egress:3128", "NO_PROXY": "localhost,.internal,vllm:8000"})
    assert (settings.https_proxy, settings.no_proxy) == ("http://egress:3128", "localhost,.internal,vllm:8000")

    def proxy(url: str) -> str | None:
        return proxy_for(url, settings.https_proxy, settings.no_proxy)

    assert proxy("https://api.openai.com/v1") == "http://egress:3128"
    assert proxy("http://api.openai.com/v1") is None  # plain http goes direct
    assert proxy("https://localhost:8443/v1") is None
    assert proxy("https://llm.internal/v1") is None
    assert proxy("https://vllm:8000/v1") is None
    assert proxy("https://vllm:9000/v1") == "http://egress:3128"
    assert proxy_for("https://api.openai.com/v1", "http://egress:3128", "*") is None
    assert proxy_for("https://api.openai.com/v1", None, "") is None


def test_each_providers_pool_gets_the_proxy_its_url_calls_for():
    from app.core import catalog
    from app.proxy.services import make_pools

    offered = catalog.parse("""
[providers.openai]
format = "openai"
base_url = "https://api.openai.com/v1"
api_key = "k"

[providers.inhouse]
format = "openai"
base_url = "https://llm.internal/v1"
api_key = "k"

[providers.local]
format = "openai"
base_url = "http://127.0.0.1:8000/v1"
api_key = "k"

[[models]]
name = "a"
provider = "openai"
api = "chat"
input_per_mtok = "1"
output_per_mtok = "1"

[[models]]
name = "b"
provider = "inhouse"
api = "chat"
input_per_mtok = "1"
output_per_mtok = "1"

[[models]]
name = "c"
provider = "local"
api = "chat"
input_per_mtok = "1"
output_per_mtok = "1"
""", {})
    pools = make_pools(offered, "http://user:secret@egress:3128", ".internal")
    assert (pools["openai"].proxy.host, pools["openai"].proxy.port) == ("egress", 3128)
    assert pools["openai"].proxy.request == (b"CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\n"
                                             b"proxy-authorization: Basic dXNlcjpzZWNyZXQ=\r\n\r\n")
    assert pools["inhouse"].proxy is None and pools["local"].proxy is None
    assert all(pool.proxy is None for pool in make_pools(offered, None, "").values())


def test_a_proxy_url_the_gateway_cannot_use_is_refused_without_showing_it():
    with pytest.raises(ValueError, match="must be an http://host:port URL") as refused:
        EgressProxy("https://user:hunter2@egress:3128", "api.openai.com:443")
    assert "hunter2" not in str(refused.value)
