"""The API's canonical error envelope: the status map, the gateway's own reasons, and rendering.

Pure: no I/O. Everything that answers a client with an error (the gateway's filters, the proxy's rewrite
of upstream errors, the HTTP parser's rejections) builds an `ErrorInfo` and renders it here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

ErrorFormat = Literal["canonical", "flat"]

CANONICAL_STATUSES = frozenset(
    {
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "PAYMENT_REQUIRED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "INTERNAL",
        "UNAVAILABLE",
    }
)

# HTTP code → (canonical status, default reason, standard message). Codes not listed fall back by class.
_BY_CODE: dict[int, tuple[str, str, str]] = {
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "The request is not valid."),
    401: ("UNAUTHENTICATED", "INVALID_CREDENTIALS", "The credential is missing, invalid or expired."),
    402: ("PAYMENT_REQUIRED", "PAYMENT_REQUIRED", "The account balance does not cover this operation."),
    403: ("PERMISSION_DENIED", "PERMISSION_DENIED", "You do not have permission to perform this operation."),
    404: ("NOT_FOUND", "RESOURCE_NOT_FOUND", "The resource was not found."),
    405: ("INVALID_ARGUMENT", "METHOD_NOT_ALLOWED", "The method is not allowed on this resource."),
    408: ("UNAVAILABLE", "REQUEST_TIMEOUT", "The request took too long."),
    409: (
        "FAILED_PRECONDITION",
        "STATE_INVALID",
        "The resource is not in a state that allows this operation.",
    ),
    410: ("NOT_FOUND", "RESOURCE_NOT_FOUND", "The resource is gone."),
    412: ("FAILED_PRECONDITION", "PRECONDITION_FAILED", "A precondition of the request failed."),
    413: ("INVALID_ARGUMENT", "REQUEST_TOO_LARGE", "The request body is too large."),
    414: ("INVALID_ARGUMENT", "URI_TOO_LONG", "The request URI is too long."),
    415: ("INVALID_ARGUMENT", "UNSUPPORTED_MEDIA_TYPE", "The request's content type is not supported."),
    422: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "The request is well-formed but not valid."),
    428: ("FAILED_PRECONDITION", "PRECONDITION_REQUIRED", "The request must be conditional."),
    429: ("RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED", "Too many requests; retry after the indicated time."),
    431: ("INVALID_ARGUMENT", "HEADERS_TOO_LARGE", "The request headers are too large."),
    500: ("INTERNAL", "INTERNAL", "An internal error occurred."),
    501: ("INTERNAL", "NOT_IMPLEMENTED", "The operation is not implemented."),
    502: ("UNAVAILABLE", "SERVICE_UNAVAILABLE", "The upstream service is unavailable."),
    503: ("UNAVAILABLE", "SERVICE_UNAVAILABLE", "The service is temporarily unavailable."),
    504: ("UNAVAILABLE", "REQUEST_TIMEOUT", "The upstream service did not answer in time."),
}
_CLIENT_DEFAULT = ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "The request could not be processed.")
_SERVER_DEFAULT = ("INTERNAL", "INTERNAL", "An internal error occurred.")


def defaults_for(http_status: int) -> tuple[str, str, str]:
    """(canonical status, default reason, standard message) for an HTTP error code."""
    found = _BY_CODE.get(http_status)
    if found is not None:
        return found
    return _SERVER_DEFAULT if http_status >= 500 else _CLIENT_DEFAULT


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """One error as the client will see it, independent of the wire format."""

    http_status: int
    reason: str
    message: str
    status: str = ""
    request_id: str = ""
    details: Sequence[Mapping[str, Any]] = ()
    headers: Mapping[str, str] = field(default_factory=dict)

    def canonical_status(self) -> str:
        return self.status or defaults_for(self.http_status)[0]


def gateway_error(
    http_status: int,
    reason: str | None = None,
    message: str | None = None,
    *,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> ErrorInfo:
    """An error the gateway itself decided on; the status's default reason and message fill in the gaps."""
    _, default_reason, default_message = defaults_for(http_status)
    return ErrorInfo(
        http_status=http_status,
        reason=reason or default_reason,
        message=message or default_message,
        details=details,
        headers=headers or {},
    )


def render(error: ErrorInfo, request_id: str, fmt: ErrorFormat) -> bytes:
    """The JSON body; the error's own request_id (kept from an upstream envelope) wins over ours."""
    rid = error.request_id or request_id
    body: dict[str, Any]
    if fmt == "flat":
        body = {"error": error.reason, "message": error.message, "request_id": rid}
        if error.details:
            body["details"] = list(error.details)
    else:
        inner: dict[str, Any] = {
            "status": error.canonical_status(),
            "reason": error.reason,
            "message": error.message,
            "request_id": rid,
        }
        if error.details:
            inner["details"] = list(error.details)
        body = {"error": inner}
    return orjson.dumps(body)
