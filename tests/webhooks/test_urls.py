"""SSRF: webhook_url and image_urls reach public addresses only, checked at submission and on connect."""

from __future__ import annotations

import base64
import io
import os
import socket

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from app.core import outbound
from tests.servers import ThreadedServer

BLOCKED = ["127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.0.1", "169.254.169.254", "100.64.0.1",
           "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1",
           "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "2001:db8::1",
           "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe",
           "2002:7f00:1::1", "::127.0.0.1"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8", "2606:4700::1111"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_refused(address):
    assert not outbound.is_public(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address):
    assert outbound.is_public(address)


@pytest.fixture(scope="module")
def strict_client(database):
    """The gateway as deployed: private addresses not allowed."""
    from starlette.testclient import TestClient

    from app.core.settings import Settings
    from app.http.app import create_app

    settings = Settings.from_env({**os.environ, "MEDIAGATE_ALLOW_PRIVATE_URLS": "0"})
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://[::1]/hook", "http://[::ffff:7f00:1]/hook",
    "http://169.254.169.254/latest/meta-data", "http://10.1.2.3/", "https://100.64.0.9/x", "http://0.0.0.0/",
    "http://2130706433/", "http://0x7f.0.0.1/", "http://no-such-host.invalid/hook",
])
def test_submission_refuses_private_webhook_urls(strict_client, make_account, url):
    account = make_account()
    r = strict_client.post("/v1/images/generations", headers=account.headers,
                           json={"model": "local-image", "prompt": "x", "webhook_url": url})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "webhook_url" and r.json()["error"]["code"] == "unsafe_url"
    assert strict_client.get("/v1/balance", headers=account.headers).json()["balance"] == "10.00000"


def test_submission_refuses_private_image_urls_by_index(strict_client, account):
    r = strict_client.post("/v1/images/generations", headers=account.headers, json={
        "model": "gpt-image-2", "prompt": "x",
        "image_urls": ["http://8.8.8.8/a.png", "http://192.168.1.20/b.png"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image_urls[1]"


def test_a_public_address_passes_the_check(strict_client, make_account):
    poor = make_account(balance="0")  # 402 proves the URL check let it through, and nothing runs
    r = strict_client.post("/v1/images/generations", headers=poor.headers, json={
        "model": "local-image", "prompt": "x", "webhook_url": "https://93.184.216.34/hook",
        "image_urls": ["http://[2606:4700::1111]/a.png"]})
    assert r.status_code == 402, r.text


@pytest.fixture(scope="module")
def loopback():
    image = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(image, "PNG")

    async def png(request):
        return Response(image.getvalue(), media_type="image/png")

    async def text(request):
        return Response(b"<html>not an image</html>", media_type="text/html")

    async def redirect(request):
        return RedirectResponse(request.query_params["to"], status_code=302)

    app = Starlette(routes=[Route("/img.png", png), Route("/page", text), Route("/redirect", redirect)])
    with ThreadedServer(app) as server:
        yield server


def test_guarded_client_refuses_loopback_on_connect(loopback):
    with outbound.outbound_client(False, timeout=5) as http:
        for host in ("127.0.0.1", "localhost"):
            with pytest.raises(httpx.ConnectError) as caught:
                http.get(f"http://{host}:{loopback.port}/img.png")
            assert isinstance(caught.value.__cause__, outbound.BlockedAddress)


@pytest.fixture
def fake_dns(monkeypatch):
    """Names resolve as the test says, and 127.0.0.1 stands in for a public address (127.0.0.2 does not),
    so a loopback server plays an internet host."""
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host].pop(0) if len(names[host]) > 1
                                                                   else names[host][0], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(outbound, "is_public", lambda ip: str(ip) == "127.0.0.1")
    return names


def test_connects_to_the_address_it_checked(loopback, fake_dns):
    fake_dns["images.example"] = ["127.0.0.1"]
    with outbound.outbound_client(False, timeout=5) as http:
        r = http.get(f"http://images.example:{loopback.port}/img.png")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def test_dns_rebinding_is_caught_on_connect(loopback, fake_dns):
    """Public when checked at submission, private when the worker connects."""
    import asyncio

    fake_dns["rebind.example"] = ["127.0.0.1", "127.0.0.2"]
    asyncio.run(outbound.check_public_url(f"http://rebind.example:{loopback.port}/img.png", "webhook_url"))
    with outbound.outbound_client(False, timeout=5) as http:
        with pytest.raises(httpx.ConnectError) as caught:
            http.get(f"http://rebind.example:{loopback.port}/img.png")
    assert isinstance(caught.value.__cause__, outbound.BlockedAddress)


def test_reference_download_rechecks_redirects(loopback, fake_dns):
    from workers import references
    from workers.backends.base import PermanentError

    fake_dns["cdn.example"] = ["127.0.0.1"]
    fake_dns["internal.example"] = ["127.0.0.2"]
    base = f"http://cdn.example:{loopback.port}"
    with outbound.outbound_client(False, timeout=5) as http:
        [ref] = references.resolve([f"{base}/img.png"], http, 1024 * 1024)
        assert ref.mime_type == "image/png"
        [ref] = references.resolve([f"{base}/redirect?to={base}/img.png"], http, 1024 * 1024)
        with pytest.raises(PermanentError, match="private or reserved"):
            references.resolve([f"{base}/redirect?to=http://internal.example:{loopback.port}/img.png"], http,
                               1024 * 1024)
        with pytest.raises(PermanentError, match="not a readable"):  # verified as an image
            references.resolve([f"{base}/page"], http, 1024 * 1024)
        with pytest.raises(PermanentError, match="larger than"):  # size cap
            references.resolve([f"{base}/img.png"], http, 10)
        with pytest.raises(PermanentError, match="non-http"):
            references.resolve([f"{base}/redirect?to=file:///etc/passwd"], http, 1024 * 1024)


def test_webhook_to_a_private_address_is_refused_by_the_worker(engine, account, loopback):
    """The worker's own check: a delivery row pointing at loopback is never connected to."""
    from sqlalchemy import select, update

    from app.core.models import WebhookDelivery
    from app.core.settings import Settings
    from app.images import lifecycle
    from app.webhooks import service
    from tests.taskrows import parked_task
    from workers import webhooks
    from workers.context import WorkerContext

    task_id = parked_task(engine, account, webhook_url=f"http://127.0.0.1:{loopback.port}/page")
    with engine.begin() as conn:
        lifecycle.cancel(conn, task_id)
        delivery_id = conn.execute(select(WebhookDelivery.id).where(WebhookDelivery.task_id == task_id)).scalar_one()
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(
            dispatched_at=service.utcnow()))  # the test worker must leave it to this test
    strict = WorkerContext.from_settings(Settings.from_env({**os.environ, "MEDIAGATE_ALLOW_PRIVATE_URLS": "0",
                                                            "MEDIAGATE_WORKER_CONCURRENCY": "5"}))
    try:
        assert webhooks.deliver(strict, delivery_id) == "retry"
    finally:
        strict.outbound.close()
        strict.http.close()
        strict.engine.dispose()
    with engine.connect() as conn:
        [deliveries] = [service.list_for_task(conn, account.id, task_id)]
    assert "non-public" in deliveries[0]["attempts"][0]["error"]


def test_image_data_uri_needs_no_network(strict_client, account):
    image = io.BytesIO()
    Image.new("RGB", (4, 4)).save(image, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()
    r = strict_client.post("/v1/images/generations", headers=account.headers,
                           json={"model": "gpt-image-2", "prompt": "x [status:400]", "image_urls": [uri]})
    assert r.status_code == 202, r.text
