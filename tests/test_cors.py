"""CORS: the policy logic of gateway/cors.py on its own, its configuration, and what browsers get through a
real gateway: preflights answered before authentication and rate limits, CORS headers on proxied answers and
on the gateway's own envelopes, the upstream's CORS headers replaced."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MakeGateway
from multidict import CIMultiDict

from gateway.config import ConfigError, CorsConfig, GatewayConfig, load_config
from gateway.cors import (
    VARY_ACTUAL,
    VARY_PREFLIGHT,
    CorsPolicy,
    Origin,
    join_vary,
    parse_allowed_origin,
    parse_origin,
    take_over_upstream_cors,
)
from gateway.filters.cors import build_cors_filter
from gateway.routing import compile_routes

APP = "https://app.example.com"
EVIL = "https://evil.example.net"
COMMON = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
DEFAULT_EXPOSED = "X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After, X-Request-ID"


def policy(methods: tuple[str, ...] = COMMON, *, ietf: bool = False, **config: Any) -> CorsPolicy:
    compiled = CorsPolicy.compile(CorsConfig(**config), route_methods=methods, ietf_headers=ietf)
    assert compiled is not None
    return compiled


def access_control(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}


# --- origins ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://app.example.com", Origin("https", "app.example.com", None)),
        ("https://app.example.com:443", Origin("https", "app.example.com", None)),  # the default port
        ("https://app.example.com:8443", Origin("https", "app.example.com", 8443)),
        ("http://app.example.com:443", Origin("http", "app.example.com", 443)),  # not http's default
        ("HTTPS://App.Example.COM", Origin("https", "app.example.com", None)),
        ("http://localhost:3000", Origin("http", "localhost", 3000)),
        ("http://127.0.0.1:8080", Origin("http", "127.0.0.1", 8080)),
        ("http://[::1]:3000", Origin("http", "[::1]", 3000)),
        ("capacitor://localhost", Origin("capacitor", "localhost", None)),
    ],
)
def test_origins_browsers_send_are_parsed(value: str, expected: Origin) -> None:
    assert parse_origin(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "null",  # sandboxed iframes, file: pages, data: URLs
        "",
        "https://app.example.com/",
        "https://evil.com/.example.com",
        "https://app.example.com/path",
        "https://user@app.example.com",
        "https://app.example.com.",
        "https://.example.com",
        "https://app..example.com",
        "https://app.example.com:0443",
        "https://app.example.com:65536",
        "https://app.example.com:",
        "https://app.example.com, https://evil.com",
        "https://app.example.com evil",
        "https://*.example.com",
        "app.example.com",
        "//app.example.com",
        "https://app.example.\u212aom",  # a Kelvin sign: lower() would make it an ASCII "k"
        "https://bücher.example.com",
    ],
)
def test_anything_else_is_no_origin(value: str) -> None:
    assert parse_origin(value) is None


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.com", True),
        ("https://a.b.example.com", True),  # one or more labels
        ("https://A.EXAMPLE.COM", True),  # letter case is not part of an origin
        ("https://a.example.com:443", True),
        ("https://example.com", False),  # "*" stands for at least one label
        ("https://evilexample.com", False),
        ("https://example.com.evil.com", False),
        ("https://a.example.com.evil.com", False),
        ("https://evil.com/.example.com", False),
        ("https://evil.com?.example.com", False),
        ("https://evil.com#.example.com", False),
        ("https://evil.com\\.example.com", False),
        ("http://a.example.com", False),  # never across schemes
        ("https://a.example.com:8443", False),  # nor ports
        ("wss://a.example.com", False),
        ("null", False),
    ],
)
def test_a_pattern_stands_for_whole_labels_of_one_scheme_and_port(origin: str, allowed: bool) -> None:
    assert policy(allow_origins=["https://*.example.com"]).allows(origin) is allowed


def test_a_patterns_port_must_match_too() -> None:
    ported = policy(allow_origins=["https://*.example.com:8443"])
    assert ported.allows("https://a.example.com:8443")
    assert not ported.allows("https://a.example.com")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (APP, True),
        ("https://APP.example.com", True),
        ("https://app.example.com:443", True),
        ("http://app.example.com", False),
        ("https://app.example.com:444", False),
        ("https://sub.app.example.com", False),
        ("https://app.example.co", False),
        ("https://app.example.com.evil.com", False),
        ("null", False),
        ("http://localhost:3000", True),
        ("http://localhost:3001", False),
    ],
)
def test_exact_origins(origin: str, allowed: bool) -> None:
    exact = policy(allow_origins=["HTTPS://App.Example.com:443", "http://localhost:3000"])
    assert exact.allows(origin) is allowed


def test_any_origin_means_any_value_even_null() -> None:
    anyone = policy(allow_origins=["*"])
    assert all(anyone.allows(o) for o in (APP, "null", "https://evil.com/.example.com"))


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("null", "sandboxed iframes"),
        ("NULL", "sandboxed iframes"),
        ("https://*.com", "two labels or more"),
        ("https://*.1", "two labels or more"),
        ("https://*.[::1]", "two labels or more"),
        ("https://*", "leading labels"),
        ("https://app-*.example.com", "leading labels"),
        ("https://*.*.example.com", "leading labels"),
        ("*://app.example.com", "leading labels"),
        ("https://app.example.com/", "without path or trailing slash"),
        ("app.example.com", "is not an origin"),
        ("https://bücher.example.com", "xn--"),
    ],
)
def test_bad_allowed_origins_say_what_is_wrong(entry: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_allowed_origin(entry)


# --- the answers --------------------------------------------------------------------------------------------


def test_an_allowed_origin_is_echoed_with_the_exposed_headers_and_vary() -> None:
    assert policy(allow_origins=[APP]).actual(APP) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Expose-Headers": DEFAULT_EXPOSED,
        "Vary": "Origin",
    }


def test_the_origin_is_echoed_exactly_as_it_came() -> None:
    answer = policy(allow_origins=[APP]).actual("https://APP.example.com")
    assert answer["Access-Control-Allow-Origin"] == "https://APP.example.com"


def test_a_refused_origin_gets_only_vary() -> None:
    assert policy(allow_origins=[APP]).actual(EVIL) == {"Vary": "Origin"}


def test_any_origin_without_credentials_is_answered_with_a_star() -> None:
    assert policy(allow_origins=["*"]).actual(APP)["Access-Control-Allow-Origin"] == "*"


def test_credentials_echo_the_origin_and_say_so() -> None:
    answer = policy(allow_origins=["https://*.example.com"], allow_credentials=True).actual(APP)
    assert answer["Access-Control-Allow-Origin"] == APP
    assert answer["Access-Control-Allow-Credentials"] == "true"


def test_the_ietf_rate_limit_headers_are_exposed_when_sent() -> None:
    exposed = policy(allow_origins=[APP], ietf=True).actual(APP)["Access-Control-Expose-Headers"]
    assert exposed == DEFAULT_EXPOSED + ", RateLimit, RateLimit-Policy"


def test_configured_expose_headers_replace_the_default_and_none_sends_no_header() -> None:
    assert (
        policy(allow_origins=[APP], expose_headers=["*"]).actual(APP)["Access-Control-Expose-Headers"] == "*"
    )
    assert "Access-Control-Expose-Headers" not in policy(allow_origins=[APP], expose_headers=[]).actual(APP)


def test_a_preflight_answer() -> None:
    answer = policy(allow_origins=[APP], max_age=90).preflight(APP, "PUT", "authorization,content-type")
    assert answer.refused is None
    assert answer.headers == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Methods": "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT",
        "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-ID",
        "Access-Control-Max-Age": "90",
        "Vary": VARY_PREFLIGHT,
    }


def test_a_preflight_lists_the_routes_methods_unless_configured() -> None:
    route_methods = policy(("GET", "HEAD", "POST"), allow_origins=[APP])
    assert (
        route_methods.preflight(APP, "POST", None).headers["Access-Control-Allow-Methods"]
        == "GET, HEAD, POST"
    )
    assert route_methods.preflight(APP, "DELETE", None).refused is not None
    configured = policy(("GET", "HEAD", "POST"), allow_origins=[APP], allow_methods=["delete"])
    assert configured.preflight(APP, "DELETE", None).headers["Access-Control-Allow-Methods"] == "DELETE"
    assert configured.preflight(APP, "POST", None).refused is not None


def test_a_preflight_with_credentials() -> None:
    answer = policy(allow_origins=[APP], allow_credentials=True).preflight(APP, "GET", None)
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize(
    ("origin", "method", "headers", "fragment"),
    [
        (EVIL, "GET", None, "Origin 'https://evil.example.net' may not call this API"),
        ("null", "GET", None, "Origin 'null'"),
        (APP, "TRACE", None, "Method 'TRACE' is not allowed"),
        (APP, "patch", None, "Method 'patch'"),  # methods compare in their case, as browsers do
        (APP, "", None, "Method ''"),
        (APP, "GET", "authorization, x-secret", "Request header 'x-secret' is not allowed"),
        (APP, "GET", "x y", "'x y' in Access-Control-Request-Headers is not a header name"),
    ],
)
def test_refused_preflights_say_why_and_carry_no_cors_headers(
    origin: str, method: str, headers: str | None, fragment: str
) -> None:
    answer = policy(allow_origins=[APP]).preflight(origin, method, headers)
    assert answer.headers == {}
    assert answer.refused is not None and fragment in answer.refused


def test_request_headers_compare_in_any_case_and_empty_entries_are_ignored() -> None:
    answer = policy(allow_origins=[APP]).preflight(APP, "GET", " Authorization ,,X-REQUEST-ID,")
    assert answer.refused is None


def test_any_header_is_answered_with_the_names_asked_for() -> None:
    anyone = policy(allow_origins=[APP], allow_headers=["*"], allow_credentials=True)
    answer = anyone.preflight(APP, "GET", "authorization, x-custom")
    assert answer.headers["Access-Control-Allow-Headers"] == "authorization, x-custom"
    assert "Access-Control-Allow-Headers" not in anyone.preflight(APP, "GET", None).headers


def test_no_allowed_origin_compiles_to_no_policy() -> None:
    assert CorsPolicy.compile(CorsConfig(), route_methods=COMMON, ietf_headers=False) is None


def test_the_upstreams_cors_headers_go_and_its_vary_stays() -> None:
    upstream = CIMultiDict(
        [
            ("Access-Control-Allow-Origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("ACCESS-CONTROL-EXPOSE-HEADERS", "X-Secret"),
            ("Vary", "Accept-Encoding"),
            ("Vary", "origin, Accept-Language"),
            ("Content-Type", "application/json"),
        ]
    )
    ours = CIMultiDict({"Vary": VARY_ACTUAL, "Access-Control-Allow-Origin": APP})
    take_over_upstream_cors(upstream, ours)
    assert list(upstream.items()) == [("Content-Type", "application/json")]
    assert ours["Vary"] == "Accept-Encoding, origin, Accept-Language"
    assert ours["Access-Control-Allow-Origin"] == APP


def test_join_vary() -> None:
    assert join_vary(["Accept-Encoding", "Origin"]) == "Accept-Encoding, Origin"
    assert join_vary(["origin", "Origin, Access-Control-Request-Method"]) == (
        "origin, Access-Control-Request-Method"
    )
    assert join_vary(["Accept-Encoding", "*", "Origin"]) == "*"


# --- configuration ------------------------------------------------------------------------------------------


def test_cors_is_off_by_default_and_costs_no_filter() -> None:
    config = GatewayConfig()
    assert config.cors.allow_origins == ()
    assert build_cors_filter(config, compile_routes(config)) is None
    disabled = GatewayConfig(
        cors={"allow_origins": [APP]},
        routes=[{"name": "all", "prefix": "/", "cors": {"allow_origins": []}}],
    )
    # The global policy still serves paths that do not route.
    assert build_cors_filter(disabled, compile_routes(disabled)) is not None


def test_a_route_policy_alone_adds_the_filter() -> None:
    config = GatewayConfig(routes=[{"name": "all", "prefix": "/", "cors": {"allow_origins": [APP]}}])
    assert build_cors_filter(config, compile_routes(config)) is not None


def config_error(tmp_path: Path, raw: dict[str, Any]) -> str:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    return str(info.value)


@pytest.mark.parametrize(
    ("cors", "line"),
    [
        (
            {"allow_origins": ["*"], "allow_credentials": True},
            "cors.allow_credentials = True: Value error, cannot be true with allow_origins ['*']",
        ),
        (
            {"allow_origins": [APP], "expose_headers": ["*"], "allow_credentials": True},
            "cors.allow_credentials = True: Value error, cannot be true with expose_headers ['*']",
        ),
        ({"allow_origins": ["*", APP]}, "cors.allow_origins = ['*', 'https://app.example.com']: Value error"),
        (
            {"allow_origins": [APP, "null"]},
            "cors.allow_origins[1] = 'null': Value error, 'null' is the origin",
        ),
        (
            {"allow_origins": ["https://app.example.com/"]},
            "cors.allow_origins[0] = 'https://app.example.com/'",
        ),
        (
            {"allow_headers": ["Authorization", "X Y"]},
            "cors.allow_headers[1] = 'X Y': Value error, is not a header",
        ),
        ({"allow_headers": ["*", "Authorization"]}, "'*' stands for every header: list it alone"),
        ({"allow_methods": ["FETCH"]}, "cors.allow_methods = ['FETCH']: Value error, 'FETCH' is not an HTTP"),
        ({"allow_methods": []}, "cors.allow_methods = []: Tuple should have at least 1 item"),
        ({"max_age": -1}, "cors.max_age = -1: Input should be greater than or equal to 0"),
        (
            {"allow_origin": [APP]},
            "cors.allow_origin = ['https://app.example.com']: unknown key; allowed here:",
        ),
    ],
)
def test_config_errors_name_the_key_the_value_and_what_to_do(
    tmp_path: Path, cors: dict[str, Any], line: str
) -> None:
    assert line in config_error(tmp_path, {"cors": cors})


def test_a_routes_config_error_names_the_route(tmp_path: Path) -> None:
    routes = [{"name": "a", "prefix": "/", "cors": {"allow_origins": ["*"], "allow_credentials": True}}]
    assert "routes[0].cors.allow_credentials = True: Value error" in config_error(
        tmp_path, {"routes": routes}
    )


def test_origins_from_the_environment() -> None:
    config = load_config(environ={"GATEWAY_CORS_ALLOW_ORIGINS": '["https://*.example.com"]'})
    assert config.cors.allow_origins == ("https://*.example.com",)


# --- through a gateway --------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST"}
FROZEN = {"rate": 1, "period": 3600}  # no refill within a test


def gateway_config(**extra: Any) -> dict[str, Any]:
    return {"cors": {"allow_origins": [APP]}, **extra}


async def test_a_preflight_is_answered_before_authentication(upstream, make_gateway: MakeGateway, client):
    gw = await make_gateway(
        upstream.url, **gateway_config(routes=[{"name": "api", "prefix": "/", "auth": "required"}])
    )
    headers = {**PREFLIGHT, "Access-Control-Request-Headers": "authorization,content-type"}
    async with client.options(f"{gw.url}/echo/calls", headers=headers) as resp:
        assert resp.status == 204
        assert await resp.read() == b""
        assert access_control(resp.headers) == {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Allow-Methods": ", ".join(sorted(COMMON)),
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-ID",
            "Access-Control-Max-Age": "600",
        }
        assert resp.headers["Vary"] == VARY_PREFLIGHT
        assert resp.headers["X-Request-ID"]
        assert "WWW-Authenticate" not in resp.headers
    # The same request without its Origin is an ordinary one, and authentication refuses it.
    async with client.options(
        f"{gw.url}/echo/calls", headers={"Access-Control-Request-Method": "POST"}
    ) as resp:
        assert resp.status == 401
        assert access_control(resp.headers) == {}
    assert upstream.requests == []


async def test_preflights_are_not_counted_against_rate_limits(upstream, make_gateway: MakeGateway, client):
    gw = await make_gateway(
        upstream.url,
        **gateway_config(
            rate_limit={"policies": {"tight": {"key": ["ip"], "burst": 2, **FROZEN}}},
            routes=[{"name": "api", "prefix": "/", "auth": "none", "rate_limit": ["tight"]}],
        ),
    )
    for _ in range(10):
        async with client.options(f"{gw.url}/echo/x", headers=PREFLIGHT) as resp:
            assert resp.status == 204
            assert "X-RateLimit-Remaining" not in resp.headers
    async with client.post(f"{gw.url}/echo/x", headers={"Origin": APP}, data=b"{}") as resp:
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Remaining"] == "1"
        assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert [seen.method for seen in upstream.requests] == ["POST"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Origin": EVIL, "Access-Control-Request-Method": "POST"}, "Origin 'https://evil.example.net'"),
        ({"Origin": "null", "Access-Control-Request-Method": "POST"}, "Origin 'null'"),
        ({"Origin": APP, "Access-Control-Request-Method": "TRACE"}, "Method 'TRACE'"),
        (
            {
                "Origin": APP,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-secret",
            },
            "Request header 'x-secret'",
        ),
    ],
)
async def test_a_refused_preflight_is_a_403_envelope_without_cors_headers(
    upstream, make_gateway: MakeGateway, client, headers: dict[str, str], message: str
):
    gw = await make_gateway(
        upstream.url, **gateway_config(routes=[{"name": "api", "prefix": "/", "auth": "required"}])
    )
    async with client.options(f"{gw.url}/echo/x", headers=headers) as resp:
        assert resp.status == 403
        body = await resp.json()
        assert body["error"]["reason"] == "CORS_NOT_ALLOWED"
        assert body["error"]["status"] == "PERMISSION_DENIED"
        assert message in body["error"]["message"]
        assert access_control(resp.headers) == {}
        assert resp.headers["Vary"] == VARY_PREFLIGHT
    assert upstream.requests == []


async def test_an_options_request_without_request_method_is_an_ordinary_request(
    upstream, make_gateway: MakeGateway, client
):
    gw = await make_gateway(
        upstream.url, **gateway_config(routes=[{"name": "api", "prefix": "/", "auth": "none"}])
    )
    async with client.options(f"{gw.url}/echo/x", headers={"Origin": APP}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert "Access-Control-Allow-Methods" not in resp.headers
    assert [seen.method for seen in upstream.requests] == ["OPTIONS"]


async def test_a_preflight_finds_its_route_by_the_method_it_asks_about(
    upstream, make_gateway: MakeGateway, client
):
    gw = await make_gateway(
        upstream.url,
        routes=[
            # Takes GET only (not OPTIONS), with a policy of its own.
            {
                "name": "reads",
                "prefix": "/echo",
                "methods": ["GET"],
                "auth": "none",
                "cors": {"allow_origins": [APP]},
            },
            {"name": "rest", "prefix": "/", "auth": "none"},  # CORS off: left to the upstream
        ],
    )
    get = {"Origin": APP, "Access-Control-Request-Method": "GET"}
    async with client.options(f"{gw.url}/echo/x", headers=get) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Methods"] == "GET, HEAD"
    assert upstream.requests == []
    # DELETE /echo/x belongs to `rest`, where the gateway leaves CORS alone: the preflight goes upstream.
    delete = {"Origin": APP, "Access-Control-Request-Method": "DELETE"}
    async with client.options(f"{gw.url}/echo/x", headers=delete) as resp:
        assert resp.status == 200
        assert access_control(resp.headers) == {}
    assert [seen.method for seen in upstream.requests] == ["OPTIONS"]


async def test_origin_patterns_through_the_gateway(upstream, make_gateway: MakeGateway, client):
    gw = await make_gateway(upstream.url, cors={"allow_origins": ["https://*.example.com"]})
    for origin in ("https://a.example.com", "https://a.b.example.com"):
        async with client.get(f"{gw.url}/echo/x", headers={"Origin": origin}) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == origin
    for origin in ("https://example.com", "https://example.com.evil.com", "http://a.example.com", "null"):
        async with client.get(f"{gw.url}/echo/x", headers={"Origin": origin}) as resp:
            assert resp.status == 200  # CORS is the browser's to enforce: the request itself goes on
            assert access_control(resp.headers) == {}
            assert resp.headers["Vary"] == "Origin"


async def test_credentials(upstream, make_gateway: MakeGateway, client):
    gw = await make_gateway(upstream.url, cors={"allow_origins": [APP], "allow_credentials": True})
    async with client.options(f"{gw.url}/echo/x", headers=PREFLIGHT) as resp:
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert resp.headers["Access-Control-Allow-Origin"] == APP
    async with client.get(f"{gw.url}/echo/x", headers={"Origin": APP}) as resp:
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert resp.headers["Access-Control-Allow-Origin"] == APP


async def test_a_route_policy_replaces_the_global_one_or_switches_cors_off(
    upstream, make_gateway: MakeGateway, client
):
    other = "https://partner.example.org"
    gw = await make_gateway(
        upstream.url,
        **gateway_config(
            routes=[
                {
                    "name": "public",
                    "prefix": "/echo/public",
                    "auth": "none",
                    "cors": {"allow_origins": ["*"]},
                },
                {
                    "name": "partner",
                    "prefix": "/echo/partner",
                    "auth": "none",
                    "cors": {"allow_origins": [other]},
                },
                {"name": "off", "prefix": "/status", "auth": "none", "cors": {"allow_origins": []}},
                {"name": "rest", "prefix": "/", "auth": "none"},
            ]
        ),
    )

    async def allow_origin(path: str, origin: str) -> str | None:
        async with client.get(f"{gw.url}{path}", headers={"Origin": origin}) as resp:
            assert resp.status == 200
            return resp.headers.get("Access-Control-Allow-Origin")

    assert await allow_origin("/echo/public", EVIL) == "*"
    assert await allow_origin("/echo/partner", other) == other
    assert await allow_origin("/echo/partner", APP) is None  # replaced whole: the global origins do not apply
    assert await allow_origin("/echo/rest", APP) == APP
    assert await allow_origin("/echo/rest", other) is None
    # Switched off: the gateway neither adds CORS headers nor removes the upstream's.
    upstream_cors = "/status/200?header=Access-Control-Allow-Origin:https://upstream.example"
    assert await allow_origin(upstream_cors, APP) == "https://upstream.example"
    async with client.options(f"{gw.url}/status/204", headers=PREFLIGHT) as resp:
        assert resp.status == 204
        assert "Access-Control-Allow-Methods" not in resp.headers
    assert upstream.requests[-1].method == "OPTIONS"  # not answered by the gateway


async def test_the_gateways_envelopes_carry_cors_headers(upstream, make_gateway: MakeGateway, client):
    gw = await make_gateway(
        upstream.url,
        **gateway_config(
            rate_limit={"policies": {"tight": {"key": ["ip"], "burst": 1, **FROZEN}}},
            routes=[
                {"name": "private", "prefix": "/echo/private", "auth": "required"},
                {"name": "limited", "prefix": "/echo/limited", "auth": "none", "rate_limit": ["tight"]},
            ],
        ),
    )
    origin = {"Origin": APP}
    async with client.get(f"{gw.url}/echo/private", headers=origin) as resp:
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert resp.headers["Access-Control-Expose-Headers"] == DEFAULT_EXPOSED
        assert resp.headers["Vary"] == "Origin"
    async with client.get(f"{gw.url}/echo/limited", headers=origin) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/echo/limited", headers=origin) as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) > 0
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]
        assert resp.headers["Vary"] == "Origin"
    # A path that does not route gets the global policy: the browser can read the 404 too.
    async with client.get(f"{gw.url}/nowhere", headers=origin) as resp:
        assert resp.status == 404
        assert resp.headers["Access-Control-Allow-Origin"] == APP
    async with client.options(f"{gw.url}/nowhere", headers=PREFLIGHT) as resp:
        assert resp.status == 204


async def test_the_upstreams_cors_headers_never_pass_beside_the_gateways(
    upstream, make_gateway: MakeGateway, client
):
    gw = await make_gateway(upstream.url, **gateway_config())
    params = [
        ("header", "Access-Control-Allow-Origin:*"),
        ("header", "Access-Control-Allow-Credentials:true"),
        ("header", "access-control-expose-headers:X-Internal"),
        ("header", "Vary:Accept-Encoding"),
    ]
    for path in ("/status/200", "/status/404"):  # streamed through, and rewritten into the envelope
        async with client.get(f"{gw.url}{path}", params=params, headers={"Origin": APP}) as resp:
            assert resp.headers.getall("Access-Control-Allow-Origin") == [APP]
            assert "Access-Control-Allow-Credentials" not in resp.headers
            assert resp.headers.getall("Access-Control-Expose-Headers") == [DEFAULT_EXPOSED]
            assert resp.headers.getall("Vary") == ["Accept-Encoding, Origin"]
        async with client.get(f"{gw.url}{path}", params=params, headers={"Origin": EVIL}) as resp:
            assert access_control(resp.headers) == {}
            assert resp.headers.getall("Vary") == ["Accept-Encoding, Origin"]
        # Without an Origin the gateway does not look: the response is the upstream's.
        async with client.get(f"{gw.url}{path}", params=params) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_no_cors_headers_without_an_origin(upstream, make_gateway: MakeGateway, client):
    gw = await make_gateway(
        upstream.url, **gateway_config(routes=[{"name": "api", "prefix": "/", "auth": "required"}])
    )
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 401
        assert access_control(resp.headers) == {}
        assert "Vary" not in resp.headers


async def test_a_gateway_without_cors_leaves_origins_alone(upstream, make_gateway: MakeGateway, client):
    gw = await make_gateway(upstream.url)
    async with client.options(f"{gw.url}/status/204", headers=PREFLIGHT) as resp:
        assert resp.status == 204
        assert access_control(resp.headers) == {}
    async with client.get(
        f"{gw.url}/status/200", params={"header": "Access-Control-Allow-Origin:*"}, headers={"Origin": APP}
    ) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Vary" not in resp.headers
    assert [seen.method for seen in upstream.requests] == ["OPTIONS", "GET"]
