"""End to end through a real Celery worker process and loopback fake upstreams."""

from __future__ import annotations

import base64
import io
import time
import uuid

import pytest
from PIL import Image
from sqlalchemy import select

from app.core.models import LedgerEntry
from tests.conftest import wait_for_task
from tests.images.test_validation import data_uri


def unique(prompt: str) -> str:
    return f"{prompt} #{uuid.uuid4().hex[:10]}"


def submit(client, account, **body) -> str:
    r = client.post("/v1/images/generations", headers=account.headers, json=body)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def download(client, url: str) -> Image.Image:
    r = client.get(url)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def ledger_rows(engine, account_id: int) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(
            select(LedgerEntry.kind, LedgerEntry.amount).where(LedgerEntry.account_id == account_id)
            .order_by(LedgerEntry.id))]


@pytest.mark.parametrize("model, size, resolution, dims", [
    ("local-image", "16:9", "1k", (1024, 576)),
    ("gpt-image-2", "1:1", "1k", (1024, 1024)),
    ("gpt-image-2", "9:16", "2k", (1152, 2048)),
    ("gemini-image", "21:9", "1k", (1029, 441)),
    ("gemini-image", "3:2", "2k", (2049, 1366)),
])
def test_completed_task_has_a_stored_image_of_the_table_dimensions(client, worker, fake_images, account,
                                                                   model, size, resolution, dims):
    task_id = submit(client, account, model=model, prompt=unique("a harbour"), size=size, resolution=resolution)
    task = wait_for_task(client, account.headers, task_id)
    assert task["status"] == "completed", task
    assert task["refunded"] is False and "error" not in task
    (url,) = task["result"]["urls"]
    assert url.startswith("http://testserver/files/") and task_id in url
    image = download(client, url)
    assert image.size == dims
    assert client.get(url.replace("http://testserver", "http://testserver/llm-api")).status_code == 200


def test_auto_keeps_the_backends_ratio_at_the_tier(client, worker, fake_images, account):
    task_id = submit(client, account, model="gpt-image-2", prompt=unique("[dims:1536x1024] wide"), size="auto")
    image = download(client, wait_for_task(client, account.headers, task_id)["result"]["urls"][0])
    assert image.size == (1024, 683)


def test_upstream_receives_model_size_and_its_own_key(client, worker, fake_images, account):
    prompt = unique("check the request")
    wait_for_task(client, account.headers, submit(client, account, model="gemini-image", prompt=prompt,
                                                  size="16:9", resolution="2k"))
    (call,) = [c for c in fake_images.calls if c["prompt"] == prompt]
    assert call["model"] == "gemini-3-pro-image-preview" and call["method"] == "generateContent"
    assert call["api_key"] == "upstream-gemini-key"
    assert call["body"]["generationConfig"] == {"responseModalities": ["IMAGE"],
                                                "imageConfig": {"imageSize": "2K", "aspectRatio": "16:9"}}

    prompt = unique("openai request")
    wait_for_task(client, account.headers, submit(client, account, model="gpt-image-2", prompt=prompt, size="2:3"))
    (call,) = [c for c in fake_images.calls if c["prompt"] == prompt]
    assert call["path"] == "/openai/v1/images/generations"
    assert call["authorization"] == "Bearer sk-upstream-openai"
    assert call["body"] == {"model": "gpt-image-2", "prompt": prompt, "n": 1, "size": "1024x1536"}


def test_reference_images_reach_openai_edits_and_gemini_inline_data(client, worker, fake_images, account):
    ref = data_uri("JPEG", size=(16, 16))
    prompt = unique("edit this")
    task = wait_for_task(client, account.headers, submit(client, account, model="gpt-image-2", prompt=prompt,
                                                         image_urls=[ref, data_uri("PNG")]))
    assert task["status"] == "completed", task
    (call,) = [c for c in fake_images.calls if c["prompt"] == prompt]
    assert call["path"] == "/openai/v1/images/edits"
    assert len(call["images"]) == 2 and Image.open(io.BytesIO(call["images"][0])).format == "JPEG"

    prompt = unique("gemini edit")
    wait_for_task(client, account.headers, submit(client, account, model="gemini-image", prompt=prompt,
                                                  image_urls=[ref]))
    (call,) = [c for c in fake_images.calls if c["prompt"] == prompt]
    part = call["body"]["contents"][0]["parts"][1]["inline_data"]
    assert part["mime_type"] == "image/jpeg"
    assert base64.b64decode(part["data"]) == base64.b64decode(ref.split(",", 1)[1])


def test_reference_urls_are_downloaded_with_retries_and_sent_upstream(client, worker, fake_images, account):
    from tests.conftest import UPSTREAM

    name = f"flaky-2-{uuid.uuid4().hex[:8]}.png"
    prompt = unique("from a url")
    task = wait_for_task(client, account.headers, submit(client, account, model="gpt-image-2", prompt=prompt,
                                                         image_urls=[f"{UPSTREAM}/files/{name}"]))
    assert task["status"] == "completed", task
    assert fake_images.per_prompt["GET " + name] == 3  # two 503s, then the image
    (call,) = [c for c in fake_images.calls if c["prompt"] == prompt]
    assert call["path"] == "/openai/v1/images/edits"
    assert Image.open(io.BytesIO(call["images"][0])).size == (32, 24)


def test_a_reference_url_that_is_not_an_image_fails_and_refunds(client, worker, fake_images, account):
    from tests.conftest import UPSTREAM

    task = wait_for_task(client, account.headers, submit(
        client, account, model="gpt-image-2", prompt=unique("bad ref"),
        image_urls=[f"{UPSTREAM}/openai/v1/images/generations"]))  # answers 405, not an image
    assert task["status"] == "failed" and task["error"]["code"] == "bad_reference_image", task
    assert task["refunded"] is True


@pytest.mark.parametrize("model, marker, code", [
    ("gpt-image-2", "[status:400]", "upstream_rejected"),
    ("gpt-image-2", "[blocked]", "upstream_rejected"),
    ("gpt-image-2", "[noimage]", "no_image"),
    ("gpt-image-2", "[garbage]", "bad_image"),
    ("gemini-image", "[noimage]", "no_image"),
    ("gemini-image", "[blocked]", "content_blocked"),
    ("gemini-image", "[status:401]", "upstream_rejected"),
])
def test_permanent_failure_fails_once_and_refunds_once(client, worker, fake_images, engine, account,
                                                       model, marker, code):
    prompt = unique(f"{marker} will fail")
    task_id = submit(client, account, model=model, prompt=prompt)
    task = wait_for_task(client, account.headers, task_id)
    assert task["status"] == "failed"
    assert task["error"]["code"] == code and task["error"]["message"]
    assert task["refunded"] is True and "result" not in task
    assert fake_images.count(prompt) == 1  # permanent errors are not retried
    rows = ledger_rows(engine, account.id)
    assert [kind for kind, _ in rows] == ["topup", "charge", "refund"]
    assert rows[1][1] == -rows[2][1]
    assert client.get("/v1/balance", headers=account.headers).json()["balance"] == "10.00000"


def test_transient_errors_are_retried_then_succeed(client, worker, fake_images, account):
    prompt = unique("[flaky:2] busy upstream")
    task = wait_for_task(client, account.headers, submit(client, account, model="gpt-image-2", prompt=prompt))
    assert task["status"] == "completed", task
    assert fake_images.count(prompt) == 3


def test_transient_errors_exhaust_retries_then_fail_and_refund(client, worker, fake_images, engine, settings,
                                                               account):
    prompt = unique("[status:503] always down")
    task = wait_for_task(client, account.headers, submit(client, account, model="gemini-image", prompt=prompt))
    assert task["status"] == "failed" and task["error"]["code"] == "upstream_unavailable"
    assert fake_images.count(prompt) == settings.backend_retries + 1
    assert [kind for kind, _ in ledger_rows(engine, account.id)] == ["topup", "charge", "refund"]


def test_an_upstream_timeout_is_retried_then_fails_and_refunds(client, worker, fake_images, engine, settings,
                                                               account):
    prompt = unique("[sleep:1.5] too slow")  # the provider's timeout is 0.5 s in the test catalog
    task = wait_for_task(client, account.headers, submit(client, account, model="slow-image", prompt=prompt))
    assert task["status"] == "failed" and task["error"]["code"] == "upstream_timeout", task
    assert task["refunded"] is True
    assert fake_images.count(prompt) == settings.backend_retries + 1
    assert [kind for kind, _ in ledger_rows(engine, account.id)] == ["topup", "charge", "refund"]


def test_a_message_delivered_twice_runs_once(client, worker, fake_images, account, settings):
    from workers.celery_app import GENERATE, make_celery

    prompt = unique("[sleep:0.5] only once")
    task_id = submit(client, account, model="gpt-image-2", prompt=prompt)
    celery = make_celery(settings)
    for _ in range(3):  # on top of the relay's own message
        celery.send_task(GENERATE, args=[task_id])
    task = wait_for_task(client, account.headers, task_id)
    assert task["status"] == "completed"
    time.sleep(1.0)  # let the extra messages be consumed
    assert fake_images.count(prompt) == 1
