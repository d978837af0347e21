"""Rewrite an upstream 4xx/5xx body into the canonical envelope, keeping its HTTP status.

Pure: the proxy reads a bounded prefix of the body and hands it here with the response's headers.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.envelope import CANONICAL_STATUSES, ErrorInfo, defaults_for
from gateway.request_id import is_sane

MAX_MESSAGE_CHARS = 500
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[_.-][A-Za-z0-9]+)*")
_REASON_FIELDS = ("reason", "code", "error_code", "error")
_MESSAGE_FIELDS = ("message", "detail", "error_description", "title", "error")


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes | None:
    """The body without its content coding, at most `limit` bytes; None when it cannot be decoded."""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if coding != "deflate" else zlib.MAX_WBITS
        try:
            # max_length bounds the output, so a small compressed bomb cannot inflate without limit.
            return zlib.decompressobj(wbits).decompress(body, limit)
        except zlib.error:
            if coding == "deflate":  # some servers send raw deflate without the zlib header
                try:
                    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, limit)
                except zlib.error:
                    return None
            return None
    return None


def normalize(http_status: int, content_type: str, body: bytes | None) -> ErrorInfo:
    """The envelope for an upstream error. `body` is None when it was too large or undecodable."""
    status, reason, message = defaults_for(http_status)
    data = _json_object(content_type, body)
    if data is None:
        return ErrorInfo(http_status=http_status, status=status, reason=reason, message=message)

    inner = data.get("error")
    if isinstance(inner, dict) and _is_canonical(inner):
        request_id = inner.get("request_id")
        return ErrorInfo(
            http_status=http_status,
            status=inner["status"],
            reason=inner["reason"],
            # Held to the same bounds as any upstream's message: prose, short, else the standard one.
            message=_find_message(inner) or message,
            request_id=request_id if isinstance(request_id, str) and is_sane(request_id) else "",
            details=_details(inner.get("details")),
        )

    source = inner if isinstance(inner, dict) else data
    return ErrorInfo(
        http_status=http_status,
        status=status,
        reason=_find_reason(source) or _find_reason(data) or reason,
        message=_find_message(source) or _find_message(data) or message,
        details=_details(source.get("details")),
    )


def _json_object(content_type: str, body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _is_canonical(inner: dict[str, Any]) -> bool:
    return (
        inner.get("status") in CANONICAL_STATUSES
        and isinstance(inner.get("reason"), str)
        and _as_reason(inner["reason"]) == inner["reason"]
        and isinstance(inner.get("message"), str)
    )


def _as_reason(value: Any) -> str | None:
    """An UPPER_SNAKE reason from a code-like string ("invalid_request" → "INVALID_REQUEST"); prose is not."""
    if not isinstance(value, str) or len(value) > 64 or not _CODE.fullmatch(value):
        return None
    if value != value.upper() and value != value.lower():
        return None  # "NotFound" or "Bad Request" style text is a message, not a code
    if value.isdigit():
        return None
    return re.sub(r"[.-]", "_", value).upper()


def _find_reason(source: dict[str, Any]) -> str | None:
    for name in _REASON_FIELDS:
        reason = _as_reason(source.get(name))
        if reason is not None:
            return reason
    return None


def _find_message(source: dict[str, Any]) -> str | None:
    for name in _MESSAGE_FIELDS:
        value = source.get(name)
        if isinstance(value, str) and value.strip() and _as_reason(value) is None:
            return value.strip() if len(value) <= MAX_MESSAGE_CHARS else None
    return None


def _details(value: Any) -> tuple[Mapping[str, Any], ...]:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return tuple(value)
    return ()
