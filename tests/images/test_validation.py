"""Every validation rule of POST /v1/images/generations: 400 naming the param, nothing charged, no task made."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from sqlalchemy import func, select

from app.core.models import ImageTask


def data_uri(fmt: str = "PNG", size=(8, 8), mime: str | None = None) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, fmt)
    mime = mime or f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(out.getvalue()).decode()


def bomb_uri() -> str:
    # A tiny PNG that claims 20000 x 20000 pixels: the decompression-bomb guard must refuse it.
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


VALID = {"model": "gpt-image-2", "prompt": "a red fox"}

CASES = [
    ({"prompt": "x"}, "model"),
    ({"model": "nope", "prompt": "x"}, "model"),
    ({"model": 5, "prompt": "x"}, "model"),
    ({"model": "gpt-image-2"}, "prompt"),
    ({**VALID, "prompt": "   "}, "prompt"),
    ({**VALID, "prompt": 42}, "prompt"),
    ({**VALID, "prompt": "x" * 32_001}, "prompt"),
    ({**VALID, "size": "1024x1024"}, "size"),
    ({**VALID, "size": 16}, "size"),
    ({**VALID, "resolution": "8k"}, "resolution"),
    ({**VALID, "resolution": 4}, "resolution"),
    ({**VALID, "resolution": ["1k"]}, "resolution"),
    ({**VALID, "resolution": "4k", "size": "1:1"}, "size"),
    ({**VALID, "resolution": "4k", "size": "3:2"}, "size"),
    ({"model": "narrow-image", "prompt": "x", "size": "16:9"}, "size"),
    ({"model": "narrow-image", "prompt": "x", "resolution": "4k", "size": "16:9"}, "resolution"),
    ({**VALID, "n": 2}, "n"),
    ({**VALID, "n": "1"}, "n"),
    ({**VALID, "n": True}, "n"),
    ({**VALID, "image_urls": "http://example.com/a.png"}, "image_urls"),
    ({**VALID, "image_urls": [1]}, "image_urls"),
    ({**VALID, "image_urls": ["http://example.com/a.png"] * 17}, "image_urls"),
    ({**VALID, "image_urls": ["ftp://example.com/a.png"]}, "image_urls[0]"),
    ({**VALID, "image_urls": ["http://example.com/a.png", "not a url"]}, "image_urls[1]"),
    ({**VALID, "image_urls": ["data:image/png;base64,!!!notbase64"]}, "image_urls[0]"),
    ({**VALID, "image_urls": ["data:image/png;base64," + base64.b64encode(b"hello").decode()]}, "image_urls[0]"),
    ({**VALID, "image_urls": [data_uri("GIF", mime="image/gif")]}, "image_urls[0]"),
    ({**VALID, "image_urls": [data_uri("GIF", mime="image/png")]}, "image_urls[0]"),
    ({**VALID, "image_urls": [bomb_uri()]}, "image_urls[0]"),
    ({**VALID, "webhook_url": "javascript:alert(1)"}, "webhook_url"),
    ({**VALID, "webhook_url": 7}, "webhook_url"),
    ({**VALID, "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
    ({**VALID, "webhook_url": "https://"}, "webhook_url"),
    ({**VALID, "prompt": None}, "prompt"),
    ({**VALID, "model": None}, "model"),
    ({**VALID, "quality": "hd"}, "quality"),
]


def _task_count(engine, account_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(ImageTask)
                            .where(ImageTask.account_id == account_id)).scalar_one()


@pytest.mark.parametrize("body, param", CASES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(CASES)])
def test_invalid_request_is_400_naming_param_and_costs_nothing(client, engine, account, body, param):
    r = client.post("/v1/images/generations", headers=account.headers, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert client.get("/v1/balance", headers=account.headers).json()["balance"] == "10.00000"
    assert _task_count(engine, account.id) == 0


def test_error_names_what_the_model_allows(client, account):
    r = client.post("/v1/images/generations", headers=account.headers,
                    json={"model": "narrow-image", "prompt": "x", "size": "16:9"})
    assert "1:1, 3:2, 2:3" in r.json()["error"]["message"]


def test_unknown_model_lists_image_models(client, account):
    r = client.post("/v1/images/generations", headers=account.headers, json={"model": "nope", "prompt": "x"})
    assert r.json()["error"]["code"] == "model_not_found"
    assert "gpt-image-2" in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"a string"'])
def test_body_must_be_a_json_object(client, account, raw):
    r = client.post("/v1/images/generations", headers={**account.headers, "content-type": "application/json"},
                    content=raw)
    assert r.status_code == 400
    assert r.json()["error"]["code"] in ("invalid_json",)


def test_oversized_data_uri_is_refused(client, account, settings):
    big = "data:image/png;base64," + "A" * (settings.max_reference_bytes * 4 // 3 + 100)
    r = client.post("/v1/images/generations", headers=account.headers, json={**VALID, "image_urls": [big]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "image_urls[0]"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_valid_data_uris_are_accepted(client, account, fmt):
    r = client.post("/v1/images/generations", headers=account.headers,
                    json={**VALID, "image_urls": [data_uri(fmt)]})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("size, resolution", [("auto", "1k"), ("21:9", "4k"), ("9:16", "2k"), ("5:4", "1k")])
def test_valid_size_resolution_pairs_are_accepted(client, account, size, resolution):
    r = client.post("/v1/images/generations", headers=account.headers,
                    json={**VALID, "size": size, "resolution": resolution, "n": 1, "image_urls": []})
    assert r.status_code == 202, r.text


def test_null_optional_parameters_take_their_defaults(client, account):
    r = client.post("/v1/images/generations", headers=account.headers,
                    json={**VALID, "size": None, "resolution": None, "n": None, "image_urls": None,
                          "webhook_url": None})
    assert r.status_code == 202, r.text
    task = client.get(f"/v1/tasks/{r.json()['task_id']}", headers=account.headers).json()
    assert (task["size"], task["resolution"], task["n"]) == ("1:1", "1k", 1)
    assert r.json()["charge"] == "0.01200"


def test_chinese_prompt_is_accepted(client, account):
    r = client.post("/v1/images/generations", headers=account.headers,
                    json={"model": "gpt-image-2", "prompt": "一只穿着宇航服的猫，赛博朋克风格"})
    assert r.status_code == 202
    task = client.get(f"/v1/tasks/{r.json()['task_id']}", headers=account.headers).json()
    assert task["prompt"] == "一只穿着宇航服的猫，赛博朋克风格"


def test_the_documented_table_is_the_delivered_sizes():
    from pathlib import Path

    from app.images.dimensions import dimensions, markdown_table

    api_doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    assert markdown_table() in api_doc
    for size in ("16:9", "21:9", "3:2"):  # exact ratios, long side near the tier
        w, h = dimensions(size, "2k")
        a, b = map(int, size.split(":"))
        assert w * b == h * a and abs(max(w, h) - 2048) <= max(a, b)
