"""One meaning per path: no spelling of a protected route's path reaches a less protected route, and
check-config names the route tables that would let one through."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import MakeGateway
from test_lifecycle import run_cli
from test_proxy import envelope, split_response
from upstream_server import UpstreamServer

from gateway.config import GatewayConfig, default_routes
from gateway.route_shadows import route_warnings
from gateway.routing import BadPath, RouteTable, compile_routes, routable_path


def _table(*routes: dict[str, Any]) -> RouteTable:
    return RouteTable(compile_routes(GatewayConfig.model_validate({"routes": list(routes)})))


def _route(table: RouteTable, raw_path: str, method: str = "POST") -> str | None:
    route = table.match(routable_path(raw_path), method)
    return None if route is None else route.name


SHIPPED = RouteTable(compile_routes(GatewayConfig()))

# Spellings an upstream that ignores case, a trailing slash or an encoded slash reads as the protected path.
RESPELT = [
    ("/auth/unregister/", "auth-unregister"),
    ("/auth/UNREGISTER", "auth-unregister"),
    ("/AUTH/Unregister", "auth-unregister"),
    ("/auth/unregister%2f", "auth-unregister"),
    ("/auth/unregister%2F", "auth-unregister"),
    ("/auth%2funregister", "auth-unregister"),
    ("/auth/unregi%73ter", "auth-unregister"),
    ("/auth/unregi%C5%BFter", "auth-unregister"),  # a long s, which Unicode case folding reads as "s"
    ("/auth/delegate/", "auth-delegate"),
    ("/auth/Delegate", "auth-delegate"),
    ("/auth/DELEGATE/", "auth-delegate"),
    ("/V1.0/ws", "events"),
    ("/v1.0/WS/", "events"),
]


@pytest.mark.parametrize(("raw_path", "route"), RESPELT)
def test_every_spelling_of_a_shipped_route_is_that_route(raw_path: str, route: str) -> None:
    assert _route(SHIPPED, raw_path) == route


@pytest.mark.parametrize(("raw_path", "route"), [("/auth/login", "auth"), ("/auth/unregisterx", "auth")])
def test_other_paths_still_take_the_less_specific_route(raw_path: str, route: str) -> None:
    assert _route(SHIPPED, raw_path) == route


async def test_no_spelling_reaches_the_upstream_without_a_credential(
    upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(upstream.url, routes=[r.model_dump() for r in default_routes()])
    for raw_path, _ in RESPELT:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                % (raw_path.encode())
            )
            async with asyncio.timeout(10):
                status, _, body = split_response(await reader.read(-1))
        finally:
            writer.close()
        assert (status, envelope(body)["reason"]) == (401, "AUTHENTICATION_REQUIRED"), raw_path
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("raw", "matched"),
    [("/a/", "/a"), ("/", "/"), ("/a%2F", "/a"), ("/a/b/?x=/", "/a/b"), ("/caf%C3%A9/", "/caf\u00e9")],
)
def test_routes_match_without_one_trailing_slash(raw: str, matched: str) -> None:
    assert routable_path(raw) == matched


@pytest.mark.parametrize("raw", ["/a%ff", "/a%C3", "/a%C0%AF", "/a/%e9t%e9"])
def test_escapes_that_are_not_utf8_are_refused(raw: str) -> None:
    """An upstream may read such bytes as anything (Latin-1, overlong UTF-8 for "/"): not ours to guess."""
    with pytest.raises(BadPath, match="not UTF-8"):
        routable_path(raw)


@pytest.mark.parametrize("raw", ["/auth/unregister%3F", "/auth/unregister%3fx=1", "/auth/unregister%23"])
def test_an_encoded_query_or_fragment_mark_is_refused(raw: str) -> None:
    """A server that decodes before it splits off the query would read /auth/unregister here."""
    with pytest.raises(BadPath, match="encoded '\\?' or '#'"):
        routable_path(raw)


def test_a_route_that_takes_get_takes_head() -> None:
    """HEAD is GET without the body, served by the GET handler upstream: it must not fall through to a
    less protected route."""
    table = _table({"name": "me", "path": "/v1.0/me", "methods": ["GET"]}, {"name": "open", "prefix": "/"})
    assert _route(table, "/v1.0/me", "HEAD") == "me"
    assert _route(table, "/v1.0/me", "POST") == "open"


def test_a_case_sensitive_route_matches_its_own_spelling_only() -> None:
    table = _table(
        {"name": "exact", "path": "/Files/{id}", "case_sensitive": True},
        {"name": "rest", "prefix": "/", "auth": "none"},
    )
    assert _route(table, "/Files/a") == "exact"
    assert _route(table, "/files/a") == "rest"
    assert _route(table, "/FILES/a") == "rest"


def test_trace_is_taken_only_by_routes_that_list_it() -> None:
    table = _table(
        {"name": "diag", "prefix": "/diag", "methods": ["TRACE", "GET"]},
        {"name": "rest", "prefix": "/"},
    )
    assert _route(table, "/diag/x", "TRACE") == "diag"
    assert _route(table, "/other", "TRACE") is None
    assert _route(table, "/other", "PROPFIND") == "rest"  # extension methods still pass
    assert table.allowed("/other") == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
    assert table.allowed("/diag/x") == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE"


# --- check-config: where a less protected route takes a route's requests --------------------------------


def _warnings(*routes: dict[str, Any], **config: Any) -> list[str]:
    return route_warnings(compile_routes(GatewayConfig.model_validate({"routes": list(routes), **config})))


def test_the_shipped_route_table_has_no_bypass() -> None:
    assert route_warnings(compile_routes(GatewayConfig())) == []


@pytest.mark.parametrize(
    ("first", "second", "why"),
    [
        ({"prefix": "/auth", "auth": "none"}, {"path": "/auth/unregister"}, "auth: none instead of required"),
        (
            {"prefix": "/", "auth": "optional"},
            {"prefix": "/v1.0/admin"},
            "auth: optional instead of required",
        ),
        ({"path": "/v1.0/{kind}/{id}"}, {"path": "/v1.0/billing/{id}", "auth": "required"}, None),
        (
            {"prefix": "/v1.0"},
            {"path": "/v1.0/billing/{id}", "require": {"credential_types": ["agent"]}},
            "weaker require",
        ),
        ({"prefix": "/v1.0"}, {"path": "/V1.0/calls", "rate_limit": ["ip-api"]}, "no rate_limit ip-api"),
        ({"prefix": "/v1.0", "methods": ["GET"]}, {"path": "/v1.0/calls", "auth": "none"}, None),
        (
            {"prefix": "/v1.0", "methods": ["GET"], "auth": "none"},
            {"path": "/v1.0/calls", "methods": ["POST"]},
            None,
        ),
        ({"prefix": "/v2", "auth": "none"}, {"path": "/v1.0/calls"}, None),
        ({"path": "/a/{x}/c", "auth": "none"}, {"prefix": "/a/b"}, "auth: none instead of required"),
        ({"path": "/a/{x}", "auth": "none"}, {"path": "/a/b/c"}, None),
    ],
)
def test_a_route_shadowed_by_a_less_protected_one_is_named(
    first: dict[str, Any], second: dict[str, Any], why: str | None
) -> None:
    found = _warnings({"name": "first", **first}, {"name": "second", **second})
    if why is None:
        assert found == []
    else:
        [warning] = found
        assert warning.startswith("routes[1] ('second'): requests for ")
        assert "also match routes[0] ('first'), which comes first" in warning and why in warning


def test_a_case_sensitive_route_with_a_less_protected_one_after_it_is_named() -> None:
    protected = {"name": "admin", "prefix": "/v1.0/Admin", "case_sensitive": True}
    [warning] = _warnings(protected, {"name": "api", "prefix": "/v1.0", "auth": "optional"})
    assert "routes[0] ('admin') is case_sensitive" in warning and "routes[1] ('api')" in warning
    assert _warnings(protected, {"name": "api", "prefix": "/v1.0"}) == []  # as protected: no bypass
    assert _warnings({**protected, "case_sensitive": False}, {"name": "api", "prefix": "/v1.0"}) == []


def test_check_config_prints_the_warnings_and_still_passes(tmp_path: Any) -> None:
    config = tmp_path / "shadowed.yaml"
    config.write_text(
        "routes:\n"
        "  - {name: auth, prefix: /auth, auth: none}\n"
        "  - {name: auth-unregister, path: /auth/unregister}\n",
        encoding="utf-8",
    )
    result = run_cli("check-config", "--config", str(config))
    assert (result.returncode, result.stdout) == (0, "ok\n")
    assert result.stderr.startswith("warning: routes[1] ('auth-unregister'): requests for /auth/unregister")
    assert "list routes[1] ('auth-unregister') first" in result.stderr
