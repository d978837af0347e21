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
MAX_DETAILS = 50
MAX_DETAIL_BYTES = 2048
MAX_DETAIL_DEPTH = 8
"""A detail object whose JSON is larger or nested deeper is left out: details are for a client to show,
field by field (and orjson, which parses 1024 levels, writes only 254)."""
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[_.-][A-Za-z0-9]+)*")
_REASON_FIELDS = ("reason", "code", "error_code", "error")
_MESSAGE_FIELDS = ("message", "detail", "error_description", "title", "error")
# Where upstreams list field-level problems: the envelope's own `details`, RFC 9457 problem extensions
# (`errors`; RFC 7807's example names `invalid-params`), validation libraries' lists; the first that
# yields any detail is kept.
_DETAIL_FIELDS = ("details", "errors", "invalid_params", "invalid-params", "violations", "validation")
_BY_FIELD = "errors"
"""The one name also taken as Rails' and Django's mapping of field to messages."""


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
            details=_as_details(inner.get("details")),
        )

    source = inner if isinstance(inner, dict) else data
    return ErrorInfo(
        http_status=http_status,
        status=status,
        reason=_find_reason(source) or _find_reason(data) or reason,
        message=_find_message(source) or _find_message(data) or message,
        # Field-level problems are the client's to fix; a server error's lists tell of its internals.
        details=(_find_details(source) or _find_details(data)) if http_status < 500 else (),
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
    status = inner.get("status")
    return (
        # A list or object is unhashable: the set lookup alone would raise on it.
        isinstance(status, str)
        and status in CANONICAL_STATUSES
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


def _find_details(source: dict[str, Any]) -> tuple[Mapping[str, Any], ...]:
    for name in _DETAIL_FIELDS:
        value = source.get(name)
        if name == _BY_FIELD and isinstance(value, dict):
            value = _by_field(value)
        details = _as_details(value)
        if details:
            return details
    return ()


def _by_field(errors: dict[str, Any]) -> list[Any]:
    """{"name": ["is blank", ...]} as one object per message: {"field": "name", "message": "is blank"}. Only
    lists count as a field's messages: an object of plain strings is more likely {"code": ..., ...}."""
    out: list[Any] = []
    for field, messages in errors.items():
        if isinstance(messages, list):
            for message in messages:
                if _short_text(message):
                    out.append({"field": field, "message": message})
                elif isinstance(message, dict):  # Rails' errors.details: {"name": [{"error": "blank"}]}
                    out.append({"field": field, **message})
    return out


def _as_details(value: Any) -> tuple[Mapping[str, Any], ...]:
    """A list's objects, and its strings as {"message": ...}; anything else in it, any string past
    MAX_MESSAGE_CHARS and any object past MAX_DETAIL_BYTES or MAX_DETAIL_DEPTH, is left out; at most
    MAX_DETAILS are kept."""
    if not isinstance(value, list):
        return ()
    out: list[Mapping[str, Any]] = []
    for item in value:
        detail = {"message": item} if _short_text(item) else item
        if isinstance(detail, dict) and _within_bounds(detail):
            out.append(detail)
            if len(out) == MAX_DETAILS:
                break
    return tuple(out)


def _short_text(value: Any) -> bool:
    """A string a client is shown as a detail's message: held to the bound of the envelope's message."""
    return isinstance(value, str) and len(value) <= MAX_MESSAGE_CHARS


def _within_bounds(detail: dict[str, Any]) -> bool:
    try:
        size = len(orjson.dumps(detail))
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        return False
    return size <= MAX_DETAIL_BYTES and _depth(detail) <= MAX_DETAIL_DEPTH


def _depth(value: Any) -> int:
    """Levels of objects and lists (a flat object is 1); only called on values orjson could write."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0
