"""Backend adapters: what users may read of a provider's error."""

import httpx

from workers.backends.base import PermanentError, TransientError, redact, status_error


def test_provider_errors_never_show_the_operators_key():
    response = httpx.Response(401, json={"error": {"message": "Incorrect API key provided: sk-proj-abc123XYZ. "
                                                              "You can find your API key at ..."}})
    error = status_error(response, "OpenAI", "sk-proj-abc123XYZ")
    assert isinstance(error, PermanentError) and error.code == "upstream_rejected"
    assert "abc123" not in error.message and "[redacted]" in error.message
    assert redact("key AIzaSyA1234567890abcdef was refused", None) == "key [redacted] was refused"
    assert redact("the secret s3cr3t-value leaked", "s3cr3t-value") == "the secret [redacted] leaked"


def test_rate_limits_and_server_errors_are_transient():
    assert isinstance(status_error(httpx.Response(429, text="slow down"), "Gemini"), TransientError)
    assert isinstance(status_error(httpx.Response(503, text="busy"), "Gemini"), TransientError)
    assert isinstance(status_error(httpx.Response(400, text="bad"), "Gemini"), PermanentError)
