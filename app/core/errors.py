"""One error type, rendered in each API family's own shape.

Every error the gateway itself makes is an `APIError`; the route's family
decides the JSON so each SDK raises its proper exception. Upstream errors are
not these: the proxy passes them through untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from urllib.parse import parse_qs

from starlette.responses import JSONResponse

from app.core.db import UNAVAILABLE, OutageLog, is_outage

log = logging.getLogger(__name__)

OPENAI, ANTHROPIC, GEMINI = "openai", "anthropic", "gemini"
# Every API route is served at the root and under this prefix (the hosted service's layout).
API_PREFIX = "/llm-api"

_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 409: "invalid_request_error",
    413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
    502: "api_error", 503: "overloaded_error", 504: "api_error",
}
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "FAILED_PRECONDITION", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 409: "ABORTED", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
    403: "permission_error", 404: "invalid_request_error", 409: "invalid_request_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
}


class APIError(Exception):
    """An expected failure with a stable `code`, the HTTP `status` and, for bad input, the `param`."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        # A message may quote what the client sent; an unpaired surrogate in it could not be encoded.
        message = message.encode("utf-8", "replace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param.encode("utf-8", "replace").decode("utf-8") if param else param
        self.type = type
        self.headers = headers

    def body(self, family: str = OPENAI) -> dict:
        if family == ANTHROPIC:
            return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                               "message": self.message}}
        if family == GEMINI:
            return {"error": {"code": self.status, "message": self.message,
                              "status": _GEMINI_STATUS.get(self.status, "INTERNAL")}}
        return {"error": {"message": self.message,
                          "type": self.type or _OPENAI_TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}

    def response(self, family: str = OPENAI) -> JSONResponse:
        return JSONResponse(self.body(family), status_code=self.status, headers=self.headers)


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def unauthorized(message: str = "Missing or invalid API key. Send 'Authorization: Bearer llm_...'.") -> APIError:
    return APIError(401, message, code="invalid_api_key")


def not_found(message: str, code: str = "not_found") -> APIError:
    return APIError(404, message, code=code)


def insufficient_balance(message: str = "Your balance is too low for this request.") -> APIError:
    return APIError(402, message, code="insufficient_balance")


RETRY_AFTER_OUTAGE = 5  # seconds a client is asked to wait while the database is unavailable


def unavailable() -> APIError:
    return APIError(503, "The gateway's database is unavailable, so the request was not carried out (should it "
                         "have been charged after all, the same Idempotency-Key replays it). Retry shortly.",
                    code="service_unavailable", type="server_error",
                    headers={"Retry-After": str(RETRY_AFTER_OUTAGE)})


def server_error() -> APIError:
    return APIError(500, "The gateway failed unexpectedly. Check your task list or usage before you retry.",
                    code="internal_error", type="server_error")


def answer_unexpected(error: BaseException, outage: OutageLog, where: str) -> APIError:
    """The answer to an exception no handler expected: a 503 when the database is unavailable
    (logged once per outage), else a 500, logged with its traceback. The app's handlers and the
    passthrough's front-door endpoints both answer with it."""
    if isinstance(error, UNAVAILABLE) and is_outage(error):
        outage.failed(error, where)
        return unavailable()
    log.error("unhandled error on %s", where, exc_info=error)
    return server_error()


def family_for(path: str, headers: Mapping[str, str] | None = None, query: str = "") -> str:
    """Which API family's error shape a path speaks (the /llm-api prefix is ignored). The shared
    model list speaks Anthropic's to a client sending `anthropic-version`, and Gemini's to one
    sending its key the Google way (`x-goog-api-key`, or `key=` in the query)."""
    if path.startswith(API_PREFIX):
        path = path[len(API_PREFIX):]
    if path.startswith("/anthropic") or path.startswith("/v1/messages"):
        return ANTHROPIC
    if path.startswith("/v1beta/"):
        return GEMINI
    if path == "/v1/models" or path.startswith("/v1/models/"):
        # Shared by every family: the client's own headers say whose (a model id may hold a colon).
        if headers is not None and "anthropic-version" in headers:
            return ANTHROPIC
        if ":" in path or (headers is not None and "x-goog-api-key" in headers) or parse_qs(query).get("key"):
            return GEMINI
    return OPENAI
