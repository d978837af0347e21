"""Upstream error bodies with JSON of unexpected types (gateway/upstream_errors.py): whatever type a field
has, the client gets the upstream's status in the envelope, never a gateway 500."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MakeGateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from upstream_server import UpstreamServer

from gateway.envelope import CANONICAL_STATUSES, render
from gateway.upstream_errors import MAX_MESSAGE_CHARS, normalize

JSON = "application/json"
_ODD_VALUES: list[Any] = [["INVALID_ARGUMENT"], {}, {"a": 1}, [], 7, 1.5, True, None, [[{}]]]


@pytest.mark.parametrize("odd", _ODD_VALUES, ids=repr)
@pytest.mark.parametrize("field", ["status", "reason", "message", "request_id", "details"])
def test_a_canonical_looking_envelope_with_a_field_of_another_type(field: str, odd: Any) -> None:
    inner = {"status": "NOT_FOUND", "reason": "CALL_NOT_FOUND", "message": "No such call.", field: odd}
    info = normalize(404, JSON, orjson.dumps({"error": inner}))
    assert (info.http_status, info.canonical_status()) == (404, "NOT_FOUND")
    for fmt in ("canonical", "flat"):
        json.loads(render(info, "req_x", fmt))


def test_an_unhashable_status_is_not_canonical_and_the_rest_is_still_read() -> None:
    inner = {"status": ["INVALID_ARGUMENT"], "reason": "CALL_NOT_FOUND", "message": "No such call."}
    info = normalize(404, JSON, orjson.dumps({"error": inner}))
    assert (info.canonical_status(), info.reason, info.message) == (
        "NOT_FOUND",
        "CALL_NOT_FOUND",
        inner["message"],
    )


# Objects keyed by the names normalize() reads (and some it does not), any JSON value under each.
_NAMES = st.sampled_from(
    [
        *("error", "status", "reason", "message", "request_id", "code", "error_code", "detail", "title"),
        *("error_description", "details", "errors", "invalid_params", "invalid-params", "violations"),
        *("validation", "field", "pointer"),
    ]
)
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from([*sorted(CANONICAL_STATUSES), "CALL_NOT_FOUND", "invalid_request", "x" * 3000]),
)
_json = st.recursive(
    _leaf,
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.one_of(_NAMES, st.text(max_size=8)), kids, max_size=6)
    ),
    max_leaves=30,
)
_bodies = st.one_of(
    st.dictionaries(_NAMES, _json, max_size=6),
    st.builds(lambda inner: {"error": inner}, st.dictionaries(_NAMES, _json, max_size=6)),
    _json,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(http_status=st.integers(min_value=400, max_value=599), body=_bodies)
def test_normalize_and_render_never_raise_for_any_json_body(http_status: int, body: Any) -> None:
    info = normalize(http_status, JSON, orjson.dumps(body))
    assert info.http_status == http_status
    assert info.canonical_status() in CANONICAL_STATUSES
    assert 0 < len(info.message) <= MAX_MESSAGE_CHARS
    for fmt in ("canonical", "flat"):
        assert isinstance(json.loads(render(info, "req_x", fmt)), dict)


async def test_an_unhashable_status_upstream_reaches_the_client_as_its_4xx(
    upstream: UpstreamServer, make_gateway: MakeGateway, client: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(upstream.url)
    async with client.get(f"{gw.url}/status/403?shape=status-list", headers={"X-Request-ID": "r1"}) as resp:
        assert resp.status == 403
        assert resp.headers["Content-Type"].startswith("application/json")
        body = await resp.json()
    assert body == {
        "error": {
            "status": "PERMISSION_DENIED",
            "reason": "BILLING_ACCESS_DENIED",
            "message": "Billing access denied.",
            "request_id": "r1",
        }
    }
