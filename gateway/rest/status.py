"""Our exceptions -> HTTP statuses: the canonical codes of gateway.errors, in HTTP's terms.

Every error answer is JSON `{"error": "..."}` (as KServe v2 and Triton answer).
Anything that is not a GatewayError is a bug: 500 with a generic message, and the
details go to the log only, exactly as on the gRPC edge.
"""

from __future__ import annotations

import logging
from typing import Final

import orjson

from gateway.errors import Code, GatewayError, code_for

log = logging.getLogger(__name__)

HTTP_BY_CODE: Final[dict[Code, int]] = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
# Seconds a client should wait before retrying a 429 or a 503: the queue drains in
# milliseconds, but a whole second keeps a retrying crowd from making it worse.
RETRY_AFTER_S = 1
_RETRYABLE: Final = frozenset({429, 503})
JSON_TYPE = "application/json"


class BodyTooLarge(Exception):
    """The request body is over the cap: 413, before any of it is parsed."""


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def http_status(exc: BaseException) -> int:
    """The HTTP status an exception is answered with (what `error_answer` sends)."""
    return 413 if isinstance(exc, BodyTooLarge) else HTTP_BY_CODE[code_for(exc)[0]]


def error_answer(exc: BaseException, where: str) -> tuple[int, bytes, dict[str, str]]:
    """The status, JSON body and extra headers for an exception raised while serving `where`."""
    if isinstance(exc, BodyTooLarge):
        return 413, error_body(str(exc)), {}
    if not isinstance(exc, GatewayError):
        log.error("unexpected error in %s", where, exc_info=exc)
    code, message = code_for(exc)
    status = HTTP_BY_CODE[code]
    headers = {"retry-after": str(RETRY_AFTER_S)} if status in _RETRYABLE else {}
    return status, error_body(message), headers
