"""Signatures per Standard Webhooks, checked with the reference Python library."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from app.webhooks import signing


def test_secret_format():
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[len("whsec_"):])) == 32
    assert secret != signing.new_secret()


def test_signature_matches_the_reference_library():
    secret = signing.new_secret()
    body = '{"type":"task.completed","data":{"prompt":"一只猫"}}'
    ours = signing.sign(secret, "msg_abc", 1674087231, body)
    theirs = Webhook(secret).sign("msg_abc", datetime.fromtimestamp(1674087231, tz=UTC), body)
    assert ours == theirs and ours.startswith("v1,")


def test_headers_verify_with_any_secret_in_use_and_nothing_else():
    import time

    old, new = signing.new_secret(), signing.new_secret()
    body = '{"type":"task.failed"}'
    headers = signing.headers([new, old], "msg_1", int(time.time()), body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(new).verify(body, headers) == {"type": "task.failed"}
    assert Webhook(old).verify(body, headers) == {"type": "task.failed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # the body is what is signed
        Webhook(new).verify(body.replace("failed", "completed"), headers)
    with pytest.raises(WebhookVerificationError):  # and the id
        Webhook(new).verify(body, {**headers, "webhook-id": "msg_2"})
    stale = signing.headers([new], "msg_1", int(time.time()) - 600, body)
    with pytest.raises(WebhookVerificationError):  # a replay from 10 minutes ago
        Webhook(new).verify(body, stale)


def test_retry_delays_follow_the_schedule_with_jitter():
    from app.webhooks.service import retry_delay

    schedule = (5, 300, 1800, 7200, 18000, 36000, 36000)
    for attempts, base in enumerate(schedule, start=1):
        delays = {retry_delay(schedule, attempts) for _ in range(50)}
        assert all(0.8 * base <= d <= 1.2 * base for d in delays)
        assert len(delays) > 1  # jittered, so receivers coming back are not hit all at once
    assert retry_delay(schedule, len(schedule) + 1) is None  # 1 attempt + 7 retries, then it stops


def test_default_schedule_is_the_documented_one():
    from app.core.settings import Settings

    assert Settings.from_env({}).webhook_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert Settings.from_env({}).webhook_timeout == 15
