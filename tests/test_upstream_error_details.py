"""Field-level details of upstream errors kept in the envelope's `details` (gateway/upstream_errors.py):
the envelope's own list, RFC 9457/7807 problem extensions, validation lists and Rails/Django's field
mapping, bounded, as JSON objects only, and nothing that is not in the body."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MakeGateway
from upstream_server import PROBLEM_ERRORS, UpstreamServer

from gateway.envelope import render
from gateway.upstream_errors import (
    MAX_DETAIL_BYTES,
    MAX_DETAIL_DEPTH,
    MAX_DETAILS,
    MAX_MESSAGE_CHARS,
    normalize,
)

PROBLEM = "application/problem+json"


def details(body: Any, content_type: str = "application/json", status: int = 400) -> list[Any]:
    return list(normalize(status, content_type, orjson.dumps(body)).details)


def test_a_problem_errors_extension_is_kept() -> None:
    errors = [{"detail": "must be a positive integer", "pointer": "#/age"}]
    body = {"type": "about:blank", "title": "Invalid", "status": 422, "errors": errors}
    assert details(body, PROBLEM, 422) == errors


def test_rfc7807s_invalid_params_example() -> None:
    """The body of RFC 7807 §3, as written there."""
    invalid = [
        {"name": "age", "reason": "must be a positive integer"},
        {"name": "color", "reason": "must be 'green', 'red' or 'blue'"},
    ]
    body = {
        "type": "https://example.net/validation-error",
        "title": "Your request parameters didn't validate.",
        "invalid-params": invalid,
    }
    assert details(body, PROBLEM) == invalid
    assert details({"title": "x", "invalid_params": invalid}, PROBLEM) == invalid


@pytest.mark.parametrize("name", ["violations", "validation", "errors", "details"])
def test_validation_lists_are_kept(name: str) -> None:
    violations = [{"field": "email", "message": "not an email"}, {"field": "name", "code": "blank"}]
    assert details({"message": "Invalid input.", name: violations}) == violations


def test_string_items_become_message_objects() -> None:
    body = {"message": "Invalid.", "errors": ["name is blank", {"field": "age"}, 7, None, ["x"], True]}
    assert details(body) == [{"message": "name is blank"}, {"field": "age"}]


def test_the_rails_and_django_errors_mapping_is_one_object_per_message() -> None:
    body = {
        "errors": {
            "email": ["is invalid", "has already been taken"],
            "name": [{"error": "blank"}],  # Rails' errors.details
            "non_field_errors": ["The fields start and end must be in order."],  # Django REST framework
            "ignored": "a plain string is no list of messages",
            "also_ignored": [1, None],
        }
    }
    assert details(body) == [
        {"field": "email", "message": "is invalid"},
        {"field": "email", "message": "has already been taken"},
        {"field": "name", "error": "blank"},
        {"field": "non_field_errors", "message": "The fields start and end must be in order."},
    ]


def test_an_errors_object_of_plain_strings_yields_nothing() -> None:
    """{"errors": {"code": ..., "message": ...}} is one error, not fields: no details invented from it."""
    info = normalize(400, "application/json", b'{"errors": {"code": "BAD", "message": "Bad input."}}')
    assert info.details == ()


def test_the_first_field_with_details_wins() -> None:
    body = {"details": [], "errors": ["from errors"], "violations": ["from violations"]}
    assert details(body) == [{"message": "from errors"}]
    body = {"details": [1, 2], "invalid_params": [{"name": "a"}]}  # no object in details: the next one
    assert details(body) == [{"name": "a"}]


def test_details_are_found_beside_an_error_object_too() -> None:
    body = {"error": {"code": "invalid_request", "message": "Invalid."}, "errors": [{"pointer": "#/a"}]}
    info = normalize(400, "application/json", orjson.dumps(body))
    assert (info.reason, list(info.details)) == ("INVALID_REQUEST", [{"pointer": "#/a"}])
    inner_first = {"error": {"details": [{"in": "error"}]}, "errors": [{"in": "body"}]}
    assert details(inner_first) == [{"in": "error"}]


def test_at_most_max_details_are_kept_in_order() -> None:
    items = [{"field": f"f{i}"} for i in range(MAX_DETAILS * 3)]
    assert details({"errors": items}) == items[:MAX_DETAILS]
    mapping = {"errors": {f"f{i}": ["bad"] for i in range(MAX_DETAILS * 3)}}
    assert details(mapping) == [{"field": f"f{i}", "message": "bad"} for i in range(MAX_DETAILS)]
    canonical = {"error": {"status": "INVALID_ARGUMENT", "reason": "R", "message": "Bad.", "details": items}}
    assert details(canonical) == items[:MAX_DETAILS]


def test_an_item_too_large_or_too_deep_is_left_out_and_the_rest_kept() -> None:
    fits = {"message": "x" * (MAX_DETAIL_BYTES - len('{"message":""}'))}
    assert len(orjson.dumps(fits)) == MAX_DETAIL_BYTES
    too_large = {"message": "x" * MAX_DETAIL_BYTES}
    deep: Any = "leaf"
    for _ in range(MAX_DETAIL_DEPTH):
        deep = {"a": deep}
    too_deep = {"a": deep}
    items = [{"ok": 1}, too_large, "y" * MAX_DETAIL_BYTES, fits, too_deep, deep, {"ok": 2}]
    assert details({"errors": items}) == [{"ok": 1}, fits, deep, {"ok": 2}]


def test_details_nested_deeper_than_orjson_writes_never_fail_the_answer() -> None:
    """orjson reads 1024 levels but writes 254: such a detail must not turn an upstream 400 into a 500."""
    nested = b'{"a":' * 300 + b"1" + b"}" * 300
    for body in (
        b'{"errors": [' + nested + b', {"ok": true}]}',
        b'{"error": {"status": "INVALID_ARGUMENT", "reason": "R", "message": "Bad.", "details": ['
        + nested
        + b', {"ok": true}]}}',
    ):
        info = normalize(400, "application/json", body)
        assert list(info.details) == [{"ok": True}]
        for fmt in ("canonical", "flat"):
            json.loads(render(info, "req_x", fmt))


def test_a_string_item_is_held_to_the_message_bound() -> None:
    fits, too_long = "x" * MAX_MESSAGE_CHARS, "y" * (MAX_MESSAGE_CHARS + 1)
    assert details({"errors": [fits, too_long, "ok"]}) == [{"message": fits}, {"message": "ok"}]
    assert details({"errors": {"name": [too_long, fits]}}) == [{"field": "name", "message": fits}]
    canonical = {
        "error": {"status": "INVALID_ARGUMENT", "reason": "R", "message": "Bad.", "details": [too_long]}
    }
    assert details(canonical) == []


LEAK = "psycopg2.OperationalError: could not connect to server at db-internal.prod:5432"


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
@pytest.mark.parametrize(
    "name", ["details", "errors", "invalid_params", "invalid-params", "violations", "validation"]
)
def test_a_server_errors_lists_are_not_details(status: int, name: str) -> None:
    """Field-level problems are the client's to fix; a 5xx's lists are the server's internals."""
    for body in (
        {name: [LEAK, {"message": LEAK}]},
        {"error": {"code": "db_down", name: [LEAK]}},
        {"errors": {"db": [LEAK]}},
    ):
        assert details(body, status=status) == []


def test_a_canonical_envelopes_own_details_are_kept_on_a_server_error() -> None:
    """An upstream that speaks the envelope chose its details for the client, whatever the status."""
    canonical = {
        "error": {"status": "UNAVAILABLE", "reason": "R", "message": "Down.", "details": [{"retry": 1}]}
    }
    assert details(canonical, status=503) == [{"retry": 1}]


def test_nothing_outside_json_bodies_or_detail_fields() -> None:
    errors = b'{"errors": ["x"]}'
    assert normalize(400, "text/plain", errors).details == ()
    assert normalize(400, "application/json", b'{"message": "Bad.", "fields": ["x"]}').details == ()
    assert normalize(400, "application/json", b'{"errors": "just a string"}').details == ()
    assert normalize(400, "application/json", b'["x"]').details == ()


async def test_problem_errors_reach_the_client_in_the_envelope(
    upstream: UpstreamServer, make_gateway: MakeGateway, client: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(upstream.url)
    async with client.get(
        f"{gw.url}/status/422?shape=problem-errors", headers={"X-Request-ID": "r1"}
    ) as resp:
        assert resp.status == 422
        assert resp.headers["Content-Type"].startswith("application/json")
        body = await resp.json()
    assert body == {
        "error": {
            "status": "INVALID_ARGUMENT",
            "reason": "INVALID_ARGUMENT",
            "message": PROBLEM_ERRORS["title"],
            "request_id": "r1",
            "details": [*PROBLEM_ERRORS["errors"][:2], {"message": "a string item"}],
        }
    }


async def test_a_server_errors_lists_do_not_reach_the_client(
    upstream: UpstreamServer, make_gateway: MakeGateway, client: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(upstream.url)
    async with client.get(f"{gw.url}/status/500?shape=problem-errors") as resp:
        assert resp.status == 500
        body = await resp.json()
    assert "details" not in body["error"]
    assert body["error"]["message"] == PROBLEM_ERRORS["title"]
