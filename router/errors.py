"""The OpenAI-shaped error body: the one definition every error answer of the proxy uses.

``{"error": {"message", "type", "param", "code"}, "object": "error"}`` as vLLM's
OpenAI server answers, so clients parse our errors like the engines' own. JSON answers
(:func:`error_body`) and in-stream SSE events (:func:`sse_error_event`) share it.
"""

from __future__ import annotations

import enum

import msgspec


class ErrorType(str, enum.Enum):
    """The ``error.type`` values the proxy answers with."""

    INVALID_REQUEST = "invalid_request_error"
    SERVICE_UNAVAILABLE = "service_unavailable"
    TIMEOUT = "timeout"
    UPSTREAM = "upstream_error"
    ERROR = "error"


_BY_STATUS = {
    400: ErrorType.INVALID_REQUEST,
    503: ErrorType.SERVICE_UNAVAILABLE,
    504: ErrorType.TIMEOUT,
}


def error_type(status: int) -> ErrorType:
    """The ``error.type`` of a proxy-made answer with HTTP ``status``."""
    return _BY_STATUS.get(status, ErrorType.ERROR)


def error_body(message: str, status: int, kind: ErrorType | None = None) -> bytes:
    """The JSON body of an error answer (``kind`` defaults to the type of ``status``)."""
    body = {
        "error": {
            "message": message,
            "type": (kind or error_type(status)).value,
            "param": None,
            "code": status,
        },
        "object": "error",
    }
    return msgspec.json.encode(body)


def sse_error_event(message: str, status: int = 502) -> bytes:
    """One SSE ``data:`` event carrying an error (a stream that broke after its start)."""
    return b"data: " + error_body(message, status, ErrorType.UPSTREAM) + b"\n\n"
