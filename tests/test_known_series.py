"""Every label set the gateway can produce starts at 0 (gateway/observability/known_series.py).

What a config makes known (pure, from the config and its compiled routes), that the series are there at 0 in a
real scrape and rise from it, that a reload adds the new routes' series, and that the catalogue keeps up with
the code: every auth reason and upstream failure kind the source can record is one it knows.
tests/test_dashboard.py holds every panel against a fresh gateway's scrape (one process, and workers).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import aiohttp
from conftest import MakeGateway, deep_merge
from test_dashboard import Scrape
from test_lifecycle import poll
from upstream_server import UpstreamServer

from gateway.auth import jwt_verifier
from gateway.config import GatewayConfig
from gateway.observability import metrics
from gateway.observability.known_series import (
    ANY_METHODS,
    UPSTREAM_FAILURES,
    auth_labels,
    known_series,
    ratelimit_labels,
    request_labels,
    upstream_error_labels,
    zero_known_series,
)
from gateway.proxy.client import FailureKind
from gateway.routing import compile_routes

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
UPSTREAM = "http://127.0.0.1:9"


def config(**extra: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(deep_merge({"upstream": {"url": UPSTREAM}}, extra))


def catalogue(cfg: GatewayConfig) -> dict[Any, set[tuple[str, ...]]]:
    return known_series(cfg, compile_routes(cfg))


POOLS = {"pool-a": {"targets": [{"url": "http://127.0.0.1:10"}, {"url": "http://127.0.0.1:11"}]}}


# --- what a config makes known ---------------------------------------------------------------------------


def test_ejected_only_with_a_pool_and_pool_full_only_on_websocket_routes() -> None:
    cfg = config(
        upstream_pools=POOLS,
        routes=[
            {"name": "plain", "prefix": "/plain", "auth": "none"},
            {"name": "pooled", "prefix": "/pooled", "auth": "none", "pool": "pool-a"},
            {"name": "ws", "path": "/ws", "auth": "none", "websocket": True},
            {"name": "ws-pooled", "path": "/wsp", "auth": "none", "websocket": True, "pool": "pool-a"},
        ],
    )
    kinds: dict[str, set[str]] = {}
    for route, kind in upstream_error_labels(compile_routes(cfg)):
        kinds.setdefault(route, set()).add(kind)
    failures = set(UPSTREAM_FAILURES)
    assert kinds == {
        "plain": failures,
        "pooled": failures | {"ejected"},
        "ws": failures | {"pool_full"},
        "ws-pooled": failures | {"ejected", "pool_full"},
    }
    # Per target of every pool: each failure kind an attempt can end with.
    assert catalogue(cfg)[metrics.TARGET_FAILURES] == {
        ("pool-a", url, kind)
        for url in ("http://127.0.0.1:10", "http://127.0.0.1:11")
        for kind in ("connect", "timeout", "reset", "protocol")
    }


def test_websocket_series_only_for_websocket_routes() -> None:
    cfg = config(
        routes=[
            {"name": "plain", "prefix": "/plain", "auth": "none"},
            {"name": "ws", "path": "/ws", "auth": "none", "websocket": True},
        ]
    )
    known = catalogue(cfg)
    assert known[metrics.WEBSOCKET_CONNECTIONS] == {("ws",)}
    assert known[metrics.WEBSOCKET_MESSAGES] == {("ws", "to_upstream"), ("ws", "to_client")}
    closes = known[metrics.WEBSOCKET_CLOSES]
    assert {route for route, _, _ in closes} == {"ws"}
    # A peer's normal close, going away, or lost connection; what the gateway itself sends.
    assert {("ws", "client", "1000"), ("ws", "upstream", "1006"), ("ws", "gateway", "1001")} <= closes
    assert {("ws", "gateway", "1009"), ("ws", "gateway", "1011")} <= closes
    assert all(code != "other" for _, _, code in closes)


def test_decisions_follow_each_policy_and_redis() -> None:
    policies = {
        "local-ip": {"key": ["ip"], "rate": 10, "burst": 20, "scope": "local"},
        "shared": {"key": ["customer"], "rate": 10, "burst": 20, "scope": "shared"},
        "shadow": {"key": ["customer"], "rate": 1, "burst": 1, "scope": "shared", "shadow": True},
        "unused": {"key": ["ip"], "rate": 1, "burst": 1, "scope": "shared"},
    }
    routes = [{"name": "api", "prefix": "/", "rate_limit": ["local-ip", "shared", "shadow"]}]
    without_redis = config(rate_limit={"policies": policies}, routes=routes)
    expected = {
        ("local-ip", "allowed"),
        ("local-ip", "limited"),
        ("shared", "allowed"),
        ("shared", "limited"),
        ("shadow", "allowed"),
        ("shadow", "shadow_limited"),  # a shadow policy never limits
    }
    assert ratelimit_labels(without_redis, compile_routes(without_redis)) == expected
    # With Redis, the shared policies can fall back; a policy no route applies decides nothing.
    with_redis = config(
        rate_limit={"policies": policies}, routes=routes, redis={"url": "redis://127.0.0.1:9"}
    )
    assert ratelimit_labels(with_redis, compile_routes(with_redis)) == expected | {
        ("shared", "fallback"),
        ("shadow", "fallback"),
    }


def test_request_codes_follow_each_route() -> None:
    cfg = config(
        rate_limit={
            "policies": {
                "limit": {"key": ["ip"], "rate": 1, "burst": 1, "scope": "local"},
                "watch": {"key": ["ip"], "rate": 1, "burst": 1, "scope": "local", "shadow": True},
            }
        },
        routes=[
            {"name": "open", "prefix": "/open", "auth": "none", "methods": ["POST"]},
            {"name": "private", "prefix": "/private", "require": {"credential_types": ["agent"]}},
            {"name": "limited", "prefix": "/limited", "auth": "optional", "rate_limit": ["limit"]},
            {"name": "watched", "prefix": "/watched", "auth": "none", "rate_limit": ["watch"]},
            {
                "name": "browser",
                "prefix": "/browser",
                "auth": "none",
                "cors": {"allow_origins": ["https://app.example.com"]},
            },
        ],
    )
    codes: dict[tuple[str, str], set[int]] = {}
    for route, method, code in request_labels(cfg, compile_routes(cfg)):
        codes.setdefault((route, method), set()).add(int(code))
    own = {400, 408, 413, 499, 500, 502, 503, 504}  # 499: the client left first
    assert {m for r, m in codes if r == "open"} == {"POST"}, "the configured methods only"
    assert codes["open", "POST"] == own
    assert {m for r, m in codes if r == "private"} == set(ANY_METHODS), "a route that takes any method"
    assert codes["private", "GET"] == own | {401, 403}
    assert codes["limited", "DELETE"] == own | {401, 429}
    assert codes["watched", "GET"] == own, "a shadow policy never answers 429"
    assert codes["browser", "OPTIONS"] == {403}, "a refused preflight"
    assert codes["unmatched", "GET"] == {400, 404, 431, 499, 500, 503}
    assert codes["unmatched", "TRACE"] == {405}
    assert 505 in codes["unmatched", "OTHER"], "what the HTTP parser refuses has no method"
    assert not any(m == "OPTIONS" for r, m in codes if r == "unmatched"), "no global CORS policy"

    known = known_series(cfg, compile_routes(cfg))
    assert {c for _, _, c in known[metrics.REQUEST_DURATION]} == {"5xx"}
    with_5xx = {key for key, answered in codes.items() if any(code >= 500 for code in answered)}
    assert {(r, m) for r, m, _ in known[metrics.REQUEST_DURATION]} == with_5xx


def test_auth_outcomes_follow_the_configured_verifiers() -> None:
    none = config(routes=[{"name": "open", "prefix": "/", "auth": "none"}])
    assert auth_labels(none, compile_routes(none)) == set(), "no route reads credentials"

    # The defaults: introspection for both kinds, every source on.
    default = config(routes=[{"name": "api", "prefix": "/"}])
    outcomes = auth_labels(default, compile_routes(default))
    assert ("failure", "no_credential", "none") in outcomes
    assert ("anonymous", "no_credential", "none") not in outcomes, "no optional route"
    assert {
        ("unavailable", "introspection", "jwt"),
        ("unavailable", "introspection", "accesskey"),
    } <= outcomes
    assert not {r for _, r, _ in outcomes} & {"bad_signature", "unknown_key", "jwks", "key_store"}
    assert not {r for res, r, _ in outcomes if res == "forbidden"}, "no route has requirements"

    # Access keys only, from the query, checked by the gateway's own file store.
    keys_only = config(
        routes=[{"name": "api", "prefix": "/", "auth": "optional"}],
        auth={
            "sources": {
                "authorization_header": False,
                "query_token": False,
                "cookie_token": False,
                "cookie_accesskey": False,
            },
            "introspect": {"jwt": False},
            "access_keys": {"stores": ["file"], "file": "/nonexistent/keys.yaml", "pepper_env": "PEPPER"},
        },
    )
    outcomes = auth_labels(keys_only, compile_routes(keys_only))
    assert {
        ("failure", "too_large", "accesskey"),
        ("failure", "no_accesskey_verifier", "accesskey"),
    } <= outcomes
    assert not {o for o in outcomes if o[0] in ("failure", "unavailable") and o[2] == "jwt"}
    assert ("failure", "empty_query_accesskey", "none") in outcomes
    assert ("failure", "unsupported_scheme", "none") not in outcomes, "the Authorization header is off"
    assert {("failure", "unknown_key", "accesskey"), ("unavailable", "key_store", "accesskey")} <= outcomes
    assert ("unavailable", "introspection", "accesskey") not in outcomes
    assert ("anonymous", "no_credential", "none") in outcomes


def test_label_sets_fit_their_metrics() -> None:
    cfg = full_auth_config()
    for metric, label_sets in catalogue(cfg).items():
        for labels in label_sets:
            assert len(labels) == len(metric._labelnames), (metric._name, labels)
            assert all(isinstance(value, str) and value for value in labels), (metric._name, labels)
    assert UPSTREAM_FAILURES == ("connect", "timeout", "reset", "protocol")


def test_zeroing_again_keeps_what_was_counted() -> None:
    cfg = config(routes=[{"name": "ks-again", "prefix": "/", "auth": "none"}])
    routes = compile_routes(cfg)
    zero_known_series(cfg, routes)
    child = metrics.UPSTREAM_ERRORS.labels("ks-again", "timeout")
    child.inc()
    zero_known_series(cfg, routes)  # as a reload does
    assert child._value.get() == 1


# --- the catalogue keeps up with the code ----------------------------------------------------------------

# Named by the code but not produced with this gateway's options, with why.
UNREACHABLE_AUTH_REASONS = {
    # PyJWT raises MissingRequiredClaimError for options["require"], which the verifier never sets; a missing
    # iss or aud (the two it checks when configured) is named "issuer" or "audience".
    "missing_claim": "PyJWT's options['require'] is never set",
}


def full_auth_config() -> GatewayConfig:
    """Every verifier and every optional check on."""
    return config(
        redis={"url": "redis://127.0.0.1:9"},
        upstream_pools=POOLS,
        rate_limit={"policies": {"p": {"key": ["ip"], "rate": 1, "burst": 1, "scope": "shared"}}},
        routes=[
            {"name": "private", "prefix": "/private", "require": {"claims": {"plan": "gold"}}},
            {"name": "optional", "prefix": "/optional", "auth": "optional", "rate_limit": ["p"]},
            {"name": "ws", "path": "/ws", "websocket": True, "pool": "pool-a"},
        ],
        auth={
            "jwt": {
                "keys": [
                    {"algorithms": ["HS256"], "secret_env": "SECRET"},
                    {"algorithms": ["RS256"], "jwks_url": "https://idp.example.com/jwks"},
                ],
                "issuer": "https://idp.example.com",
                "audience": ["voipbin"],
                "max_age": 3600,
            },
            "access_keys": {
                "stores": ["redis", "file", "introspect"],
                "file": "/nonexistent/keys.yaml",
                "pepper_env": "PEPPER",
            },
        },
    )


def _sources(*paths: Path) -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in paths)


def test_every_auth_reason_in_the_code_is_known() -> None:
    """A check added to a verifier without its label here would start at 1 again: its first failures would
    not show in the auth panel's rate()."""
    source = _sources(*sorted((GATEWAY / "auth").glob("*.py")), GATEWAY / "filters" / "auth.py")
    raised = set(
        re.findall(r'(?:InvalidCredential|MalformedCredential|VerifierUnavailable)\(\s*"(\w+)"', source)
    )
    recorded = set(re.findall(r'ctx\.auth = \("\w+", "(\w+)"\)', source))
    named = set(re.findall(r'"(\w+)"', inspect.getsource(jwt_verifier._check_name))) - {"iss", "aud"}
    # The two reasons made from a template: one per credential source, one per credential kind.
    templates = re.findall(
        r'(?:InvalidCredential|MalformedCredential|VerifierUnavailable)\(\s*f"([^"]*)"', source
    )
    assert sorted(templates) == ["empty_{credential.source}", "no_{credential.kind}_verifier"], templates
    assert raised and recorded and named, "the scan found nothing: has the auth code moved?"

    cfg = full_auth_config()
    known = {reason for _, reason, _ in auth_labels(cfg, compile_routes(cfg))}
    missing = (raised | recorded | named) - known - set(UNREACHABLE_AUTH_REASONS)
    assert not missing, f"auth reasons the code records but known_series does not start at 0: {missing}"
    sources = {"authorization_header", "query_token", "cookie_token", "query_accesskey", "cookie_accesskey"}
    assert {f"empty_{s}" for s in sources} | {"no_jwt_verifier", "no_accesskey_verifier"} <= known
    assert not UNREACHABLE_AUTH_REASONS.keys() & known


def test_every_upstream_failure_kind_in_the_code_is_known() -> None:
    source = _sources(*sorted((GATEWAY / "proxy").glob("*.py")))
    kinds = set(re.findall(r'upstream_error = "(\w+)"', source))
    kinds |= set(re.findall(r'UpstreamFailure\(\s*"(\w+)"', source))
    assert {"ejected", "pool_full"} <= kinds, "the scan found nothing: has the proxy code moved?"
    cfg = full_auth_config()
    known = {kind for _, kind in upstream_error_labels(compile_routes(cfg))}
    assert kinds | set(FailureKind.__args__) <= known


# --- in a real scrape --------------------------------------------------------------------------------------


async def scrape(client: aiohttp.ClientSession, admin_url: str) -> Scrape:
    async with client.get(f"{admin_url}/metrics") as resp:
        result = Scrape(await resp.text(), resp.status)
    result.require_ok()
    return result


def value(result: Scrape, sample: str, **labels: str) -> float | None:
    """The one series with exactly these labels, or None when it is not in the scrape."""
    found = [v for got, v in result.values.get(sample, []) if got == labels]
    assert len(found) <= 1, found
    return found[0] if found else None


async def test_an_upstream_error_rises_from_zero(
    upstream: UpstreamServer, make_gateway: MakeGateway, client: aiohttp.ClientSession
) -> None:
    # Route names no other test uses: the registry is the process's, shared by every test's gateway.
    gw = await make_gateway(upstream.url, routes=[{"name": "ks-broken", "prefix": "/reset", "auth": "none"}])
    before = await scrape(client, gw.admin_url)
    assert value(before, "gateway_upstream_errors_total", route="ks-broken", kind="reset") == 0
    assert value(before, "gateway_requests_total", route="ks-broken", method="POST", code="502") == 0
    assert value(before, "gateway_upstream_errors_total", route="ks-broken", kind="ejected") is None, (
        "no pool"
    )

    async with client.post(f"{gw.url}/reset") as resp:
        assert resp.status == 502
        await resp.read()

    # Recorded as the response finishes, which may be a moment after the client has it.
    scrapes = [before]

    async def counted() -> bool:
        scrapes.append(await scrape(client, gw.admin_url))
        return bool(value(scrapes[-1], "gateway_upstream_errors_total", route="ks-broken", kind="reset"))

    await poll(counted, within=30.0, what="the reset counted")
    after = scrapes[-1]
    assert value(after, "gateway_upstream_errors_total", route="ks-broken", kind="reset") == 1
    assert value(after, "gateway_requests_total", route="ks-broken", method="POST", code="502") == 1
    assert value(after, "gateway_upstream_errors_total", route="ks-broken", kind="connect") == 0


async def test_a_reload_adds_the_new_routes_series(
    upstream: UpstreamServer, make_gateway: MakeGateway, client: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(upstream.url, routes=[{"name": "ks-first", "prefix": "/", "auth": "none"}])
    before = await scrape(client, gw.admin_url)
    assert value(before, "gateway_upstream_errors_total", route="ks-first", kind="timeout") == 0
    assert value(before, "gateway_upstream_errors_total", route="ks-added", kind="timeout") is None

    new = GatewayConfig.model_validate(
        deep_merge(
            gw.server.config.model_dump(),
            {
                "upstream_pools": {"ks-pool": {"targets": [{"url": upstream.url}]}},
                "rate_limit": {
                    "policies": {"ks-policy": {"key": ["ip"], "rate": 1, "burst": 1, "scope": "local"}}
                },
                "routes": [
                    {"name": "ks-added", "prefix": "/added", "auth": "none", "pool": "ks-pool"},
                    {"name": "ks-first", "prefix": "/", "auth": "none", "rate_limit": ["ks-policy"]},
                ],
            },
        )
    )
    assert await gw.server.reload(new)
    after = await scrape(client, gw.admin_url)
    assert value(after, "gateway_upstream_errors_total", route="ks-added", kind="ejected") == 0
    assert value(after, "gateway_requests_total", route="ks-added", method="GET", code="503") == 0
    assert value(after, "gateway_ratelimit_decisions_total", policy="ks-policy", decision="limited") == 0
    assert value(after, "gateway_requests_total", route="ks-first", method="PUT", code="429") == 0
    target = {"pool": "ks-pool", "target": upstream.url}
    assert value(after, "gateway_upstream_target_failures_total", **target, kind="connect") == 0
    assert value(after, "gateway_upstream_target_requests_total", **target) == 0
