"""gateway/envelope.py (status map, rendering) and gateway/upstream_errors.py (upstream bodies → envelope)."""

from __future__ import annotations

import functools
import gzip
import json
import re
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.envelope import CANONICAL_STATUSES, ErrorInfo, defaults_for, gateway_error, render
from gateway.upstream_errors import MAX_MESSAGE_CHARS, decode_body, normalize

JSON = "application/json"
REASON = re.compile(r"^[A-Z0-9_]+$")

# --- the status map (shared/reference/API-CONVENTIONS.md) ---------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (401, "UNAUTHENTICATED", "INVALID_CREDENTIALS"),
        (402, "PAYMENT_REQUIRED", "PAYMENT_REQUIRED"),
        (403, "PERMISSION_DENIED", "PERMISSION_DENIED"),
        (404, "NOT_FOUND", "RESOURCE_NOT_FOUND"),
        (409, "FAILED_PRECONDITION", "STATE_INVALID"),
        (422, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (429, "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED"),
        (500, "INTERNAL", "INTERNAL"),
        (502, "UNAVAILABLE", "SERVICE_UNAVAILABLE"),
        (503, "UNAVAILABLE", "SERVICE_UNAVAILABLE"),
        (504, "UNAVAILABLE", "REQUEST_TIMEOUT"),
        # Not in the map: fall back by class.
        (418, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (499, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (507, "INTERNAL", "INTERNAL"),
        (599, "INTERNAL", "INTERNAL"),
    ],
)
def test_status_map(code: int, status: str, reason: str) -> None:
    got_status, got_reason, message = defaults_for(code)
    assert (got_status, got_reason) == (status, reason)
    assert got_status in CANONICAL_STATUSES
    assert message and message.endswith(".")
    info = gateway_error(code)
    got = (info.http_status, info.canonical_status(), info.reason, info.message)
    assert got == (code, status, reason, message)


def test_canonical_statuses_are_the_documented_ones() -> None:
    assert CANONICAL_STATUSES == {
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


def test_every_code_maps_to_a_canonical_status_and_reason() -> None:
    for code in range(400, 600):
        status, reason, message = defaults_for(code)
        assert status in CANONICAL_STATUSES, code
        assert REASON.fullmatch(reason), code
        assert 0 < len(message) <= MAX_MESSAGE_CHARS
        if code >= 500:
            assert status in {"INTERNAL", "UNAVAILABLE"}, code


def test_gateway_error_keeps_given_reason_message_details_headers() -> None:
    info = gateway_error(
        429, "RATE_LIMIT_EXCEEDED", "slow down", details=[{"limited_by": "ip"}], headers={"Retry-After": "3"}
    )
    assert info.reason == "RATE_LIMIT_EXCEEDED"
    assert info.message == "slow down"
    assert list(info.details) == [{"limited_by": "ip"}]
    assert info.headers == {"Retry-After": "3"}
    assert gateway_error(404, "ROUTE_NOT_FOUND").message == defaults_for(404)[2]


def test_explicit_status_wins_over_the_code_default() -> None:
    explicit = ErrorInfo(http_status=409, reason="X", message="m", status="ALREADY_EXISTS")
    assert explicit.canonical_status() == "ALREADY_EXISTS"
    assert ErrorInfo(http_status=409, reason="X", message="m").canonical_status() == "FAILED_PRECONDITION"


# --- render -------------------------------------------------------------------------------------------------


def test_render_canonical() -> None:
    info = gateway_error(403, "BILLING_ACCESS_DENIED", "No.", details=[{"account": "a1"}])
    assert orjson.loads(render(info, "req_1", "canonical")) == {
        "error": {
            "status": "PERMISSION_DENIED",
            "reason": "BILLING_ACCESS_DENIED",
            "message": "No.",
            "request_id": "req_1",
            "details": [{"account": "a1"}],
        }
    }


def test_render_flat() -> None:
    info = gateway_error(404, "CALL_NOT_FOUND", "No call.", details=[{"id": "x"}])
    assert orjson.loads(render(info, "req_2", "flat")) == {
        "error": "CALL_NOT_FOUND",
        "message": "No call.",
        "request_id": "req_2",
        "details": [{"id": "x"}],
    }


@pytest.mark.parametrize("fmt", ["canonical", "flat"])
def test_render_omits_empty_details(fmt: Any) -> None:
    body = orjson.loads(render(gateway_error(500), "req_3", fmt))
    inner = body["error"] if fmt == "canonical" else body
    assert "details" not in inner
    assert inner["request_id"] == "req_3"


@pytest.mark.parametrize("fmt", ["canonical", "flat"])
def test_render_upstream_request_id_wins(fmt: Any) -> None:
    info = ErrorInfo(http_status=404, reason="R", message="m", request_id="up-123")
    body = orjson.loads(render(info, "req_ours", fmt))
    inner = body["error"] if fmt == "canonical" else body
    assert inner["request_id"] == "up-123"


def test_render_escapes_message() -> None:
    text = 'quote " and \n newline </script>'
    assert orjson.loads(render(gateway_error(400, "X", text), "r", "canonical"))["error"]["message"] == text


# --- normalize ----------------------------------------------------------------------------------------------


def _n(body: Any, status: int = 404, content_type: str = JSON) -> ErrorInfo:
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return normalize(status, content_type, raw)


def test_canonical_envelope_passes_through() -> None:
    body = {
        "error": {
            "status": "PERMISSION_DENIED",
            "reason": "BILLING_ACCESS_DENIED",
            "message": "You do not have permission to access this billing account.",
            "request_id": "req_upstream",
            "details": [{"account_id": "a"}],
        }
    }
    info = _n(body, 403)
    assert info.http_status == 403
    assert info.canonical_status() == "PERMISSION_DENIED"
    assert info.reason == "BILLING_ACCESS_DENIED"
    assert info.message == "You do not have permission to access this billing account."
    assert info.request_id == "req_upstream"
    assert list(info.details) == [{"account_id": "a"}]
    assert orjson.loads(render(info, "req_ours", "canonical")) == body


def test_canonical_envelope_keeps_its_own_status() -> None:
    info = _n({"error": {"status": "ALREADY_EXISTS", "reason": "NUMBER_TAKEN", "message": "Taken."}}, 409)
    assert info.canonical_status() == "ALREADY_EXISTS"


def test_canonical_envelope_without_request_id_is_filled_at_render() -> None:
    info = _n({"error": {"status": "NOT_FOUND", "reason": "CALL_NOT_FOUND", "message": "No call."}})
    assert info.request_id == ""
    assert orjson.loads(render(info, "req_ours", "canonical"))["error"]["request_id"] == "req_ours"


@pytest.mark.parametrize("rid", [5, None, ["x"]])
def test_canonical_envelope_non_string_request_id_dropped(rid: Any) -> None:
    info = _n({"error": {"status": "NOT_FOUND", "reason": "R", "message": "No call.", "request_id": rid}})
    assert info.request_id == ""
    assert info.reason == "R"


@pytest.mark.parametrize(
    ("inner", "reason", "message"),
    [
        # Not a canonical status: the code decides the status, the reason is still read.
        ({"status": "BOGUS", "reason": "CALL_NOT_FOUND", "message": "Gone."}, "CALL_NOT_FOUND", "Gone."),
        # Reason not UPPER_SNAKE: normalised.
        ({"status": "NOT_FOUND", "reason": "call-not-found", "message": "Gone."}, "CALL_NOT_FOUND", "Gone."),
        # Google style: numeric code, no reason.
        ({"code": 404, "message": "No call.", "status": "NOT_FOUND"}, "RESOURCE_NOT_FOUND", "No call."),
    ],
)
def test_nearly_canonical_envelopes(inner: dict[str, Any], reason: str, message: str) -> None:
    info = _n({"error": inner})
    assert (info.canonical_status(), info.reason, info.message) == ("NOT_FOUND", reason, message)


DEFAULT_404 = defaults_for(404)[2]
LONG = "x " * 300  # 600 chars of prose


@pytest.mark.parametrize(
    ("body", "reason", "message"),
    [
        ({"error": "CALL_NOT_FOUND", "message": "No such call."}, "CALL_NOT_FOUND", "No such call."),
        ({"error": "invalid_request", "error_description": "Bad id."}, "INVALID_REQUEST", "Bad id."),
        ({"error": "invalid-request.id"}, "INVALID_REQUEST_ID", DEFAULT_404),
        ({"code": "QUOTA_EXCEEDED"}, "QUOTA_EXCEEDED", DEFAULT_404),
        ({"error_code": "quota_exceeded", "message": "Over quota."}, "QUOTA_EXCEEDED", "Over quota."),
        ({"reason": "A", "code": "B"}, "A", DEFAULT_404),  # reason beats code
        ({"code": 404, "message": "No such call."}, "RESOURCE_NOT_FOUND", "No such call."),
        ({"detail": "Not found."}, "RESOURCE_NOT_FOUND", "Not found."),
        ({"message": "  padded message  "}, "RESOURCE_NOT_FOUND", "padded message"),
        ({"message": "   "}, "RESOURCE_NOT_FOUND", DEFAULT_404),
        ({"message": LONG}, "RESOURCE_NOT_FOUND", DEFAULT_404),
        ({"message": "y" * 499 + " "}, "RESOURCE_NOT_FOUND", "y" * 499),
        ({"message": 42}, "RESOURCE_NOT_FOUND", DEFAULT_404),
        # Prose is never a reason; it may be the message.
        ({"error": "Not Found"}, "RESOURCE_NOT_FOUND", "Not Found"),
        ({"error": "NotFound"}, "RESOURCE_NOT_FOUND", "NotFound"),
        ({"error": "Call Not_Found"}, "RESOURCE_NOT_FOUND", "Call Not_Found"),
        ({"code": "NotFound", "message": "The call."}, "RESOURCE_NOT_FOUND", "The call."),
        ({"error": "404"}, "RESOURCE_NOT_FOUND", "404"),
        ({"error": "X" * 65}, "RESOURCE_NOT_FOUND", "X" * 65),
        ({"error": "X" * 64}, "X" * 64, DEFAULT_404),
        # A code-like message is not a message.
        ({"message": "NOT_FOUND"}, "RESOURCE_NOT_FOUND", DEFAULT_404),
        # Nested non-canonical error object.
        ({"error": {"code": "CALL_GONE", "message": "It is gone."}}, "CALL_GONE", "It is gone."),
    ],
)
def test_normalize_other_json_shapes(body: dict[str, Any], reason: str, message: str) -> None:
    info = _n(body)
    assert (info.http_status, info.canonical_status()) == (404, "NOT_FOUND")
    assert (info.reason, info.message) == (reason, message)
    assert info.request_id == ""


def test_problem_json() -> None:
    body = {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "No call with id 1.",
        "instance": "/v1.0/calls/1",
    }
    info = _n(body, 404, "application/problem+json")
    assert (info.reason, info.message) == ("RESOURCE_NOT_FOUND", "No call with id 1.")
    title_only = _n({"title": "Conflict happened", "status": 409}, 409, "application/problem+json")
    assert (title_only.canonical_status(), title_only.reason, title_only.message) == (
        "FAILED_PRECONDITION",
        "STATE_INVALID",
        "Conflict happened",
    )


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON ; charset=UTF-8",
        "application/problem+json",
        "application/vnd.api+json; charset=utf-8",
    ],
)
def test_json_media_types(content_type: str) -> None:
    assert _n({"error": "CALL_NOT_FOUND"}, content_type=content_type).reason == "CALL_NOT_FOUND"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><body>502 Bad Gateway</body></html>"),
        ("text/plain", b"upstream connect error"),
        ("text/plain", b'{"error": "CALL_NOT_FOUND"}'),  # JSON text under a non-JSON type is not read
        ("", b'{"error": "CALL_NOT_FOUND"}'),
        ("application/jsonp", b'{"error": "CALL_NOT_FOUND"}'),
        (JSON, b""),
        (JSON, None),
        (JSON, b"{not json"),
        (JSON, b'["CALL_NOT_FOUND"]'),
        (JSON, b'"CALL_NOT_FOUND"'),
        (JSON, b"null"),
        (JSON, b"\xff\xfe{}"),
        (JSON, b"[" * 5000),
    ],
)
@pytest.mark.parametrize("code", [400, 404, 429, 502])
def test_unreadable_bodies_get_the_defaults(content_type: str, body: bytes | None, code: int) -> None:
    info = normalize(code, content_type, body)
    status, reason, message = defaults_for(code)
    got = (info.http_status, info.canonical_status(), info.reason, info.message)
    assert got == (code, status, reason, message)
    assert info.details == ()


@pytest.mark.parametrize(
    ("details", "kept"),
    [
        ([{"field": "name"}, {"field": "id"}], ({"field": "name"}, {"field": "id"})),
        ([], ()),
        ([{"field": "name"}, "oops", 3, None], ({"field": "name"}, {"message": "oops"})),
        ("a string", ()),
        ({"field": "name"}, ()),
        ([1, 2], ()),
        (None, ()),
    ],
)
def test_details_kept_only_as_objects_from_a_list(details: Any, kept: tuple[Any, ...]) -> None:
    canonical = _n({"error": {"status": "NOT_FOUND", "reason": "R", "message": "m m", "details": details}})
    flat = _n({"error": "R", "message": "m m", "details": details})
    assert tuple(canonical.details) == kept
    assert tuple(flat.details) == kept


@pytest.mark.parametrize("bad", ["", "   ", "m " * 1000], ids=["empty", "blank", "2000-chars"])
def test_canonical_pass_through_bounds_the_message(bad: str) -> None:
    # The envelope promises a non-empty message of at most 500 chars; the pass-through path takes the
    # upstream's message as is, unlike the other shapes, which fall back to the standard message.
    info = _n({"error": {"status": "NOT_FOUND", "reason": "CALL_NOT_FOUND", "message": bad}})
    assert info.reason == "CALL_NOT_FOUND"
    assert info.message.strip()
    assert len(info.message) <= MAX_MESSAGE_CHARS


# --- decode_body --------------------------------------------------------------------------------------------

PAYLOAD = b'{"error": "CALL_NOT_FOUND", "message": "The call was not found."}'


def _raw_deflate(data: bytes) -> bytes:
    comp = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return comp.compress(data) + comp.flush()


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        ("", PAYLOAD),
        ("identity", PAYLOAD),
        (" Identity ", PAYLOAD),
        ("gzip", gzip.compress(PAYLOAD)),
        ("GZIP", gzip.compress(PAYLOAD)),
        ("x-gzip", gzip.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)),
        ("deflate", _raw_deflate(PAYLOAD)),
    ],
)
def test_decode_body(coding: str, encoded: bytes) -> None:
    assert decode_body(encoded, coding, 65536) == PAYLOAD


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        ("br", PAYLOAD),
        ("zstd", PAYLOAD),
        ("compress", PAYLOAD),
        ("gzip, gzip", gzip.compress(gzip.compress(PAYLOAD))),
        ("gzip", PAYLOAD),  # not gzip at all
        ("gzip", b"\x1f\x8b\x08\x00garbage-garbage"),
        ("x-gzip", zlib.compress(PAYLOAD)),  # zlib under a gzip label
        ("deflate", b"\x00\x01\x02 definitely not deflate \xff" * 3),
    ],
)
def test_decode_body_unknown_or_corrupt_is_none(coding: str, encoded: bytes) -> None:
    assert decode_body(encoded, coding, 65536) is None


@functools.cache
def _bomb(coding: str) -> bytes:
    zeros = b"\0" * 50_000_000
    return gzip.compress(zeros, 6) if coding == "gzip" else zlib.compress(zeros, 6)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("limit", [1, 1000, 65536])
def test_decode_body_bounds_a_decompression_bomb(coding: str, limit: int) -> None:
    bomb = _bomb(coding)
    assert len(bomb) < 100_000
    out = decode_body(bomb, coding, limit)
    assert out is not None
    assert len(out) == limit
    assert set(out) == {0}


def test_decode_body_then_normalize() -> None:
    body = decode_body(gzip.compress(PAYLOAD), "gzip", 65536)
    assert normalize(404, JSON, body).reason == "CALL_NOT_FOUND"


# --- property -----------------------------------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.text(max_size=30),
    st.sampled_from(["CALL_NOT_FOUND", "invalid_request", "Not Found", "NotFound", "", " ", "x" * 600]),
)
_json_value = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)
_field = st.sampled_from(
    [
        *("error", "message", "reason", "code", "error_code", "detail", "title", "error_description"),
        *("details", "errors", "invalid_params", "invalid-params", "violations", "validation"),
    ]
)
_loose_object = st.dictionaries(_field, _json_value, max_size=5)
_canonical = st.fixed_dictionaries(
    {
        "status": st.sampled_from(sorted(CANONICAL_STATUSES)),
        "reason": st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True),
        "message": st.one_of(st.text(max_size=20), st.sampled_from(["", " ", "m" * 600])),
    },
    optional={"request_id": _json_value, "details": _json_value},
)
_structured = st.one_of(
    _loose_object,
    st.builds(lambda inner: {"error": inner}, _loose_object),
    st.builds(lambda inner: {"error": inner}, _canonical),
    _json_value,
).map(lambda value: orjson.dumps(value))
_bodies = st.one_of(st.none(), st.binary(max_size=200), _structured)
_content_types = st.one_of(
    st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "application/problem+json", "text/html", ""]
    ),
    st.text(max_size=30),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    http_status=st.integers(min_value=400, max_value=599),
    content_type=_content_types,
    body=_bodies,
    fmt=st.sampled_from(["canonical", "flat"]),
)
def test_normalize_always_yields_a_valid_envelope(
    http_status: int, content_type: str, body: bytes | None, fmt: Any
) -> None:
    info = normalize(http_status, content_type, body)
    assert info.http_status == http_status
    assert info.canonical_status() in CANONICAL_STATUSES
    assert REASON.fullmatch(info.reason)
    assert isinstance(info.message, str)
    assert 0 < len(info.message) <= MAX_MESSAGE_CHARS
    assert all(isinstance(item, dict) for item in info.details)
    rendered = json.loads(render(info, "req_x", fmt))
    assert isinstance(rendered, dict) and "error" in rendered
