"""Every label set the gateway can produce for its labelled metrics, created at start so each series is 0.

A series whose first sample is already 1 has rate() 0 over its first window, so the first upstream connect
error, the first 429 of a policy or the first auth failure would not show on the dashboard. Creating the
series at 0 when a config is applied (start, and again after each reload, for new routes, policies and pools)
makes the first event a rise from 0. Labels stay bounded as before: only values this config can produce
(no new labels, no guessed values); the per-request paths are unchanged (metrics.RequestMetrics).

Left to their own code: build and config info, team counters (values come from callers), pool targets'
requests, ejections and ejected gauges (proxy/targets.py) and gateway_redis_up (registered only with Redis).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, get_args

from aiohttp import WSCloseCode

from gateway.observability import metrics
from gateway.proxy.client import FailureKind
from gateway.proxy.ws_relay import ABNORMAL, GOING_AWAY, INTERNAL_ERROR, MESSAGE_TOO_BIG, NORMAL

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.routing import Route

LabelSets = set[tuple[str, ...]]

ANY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
"""Methods counted for a route that takes any (and for requests no route took): the ones APIs use."""
PARSER_METHOD = "OTHER"
"""What a request refused by the HTTP parser is counted under: its method could not be read."""

# The statuses the gateway itself answers a routed request with (gateway/envelope.py's map): a refused
# WebSocket upgrade or handshake (400), a request body too slow (408) or too large (413), its own failure
# (500), an upstream that failed (502) or timed out (504), and 503: an ejected pool, the WebSocket stream
# cap, a credential or a `closed` rate limit that cannot be checked, or the upstream's own UNAVAILABLE.
# 499: the client left before any answer (filters/observe.py), the first sign of clients timing out.
ROUTE_CODES = (400, 408, 413, 499, 500, 502, 503, 504)
AUTH_CODE = 401  # a route that reads credentials (auth required or optional)
FORBIDDEN_CODE = 403  # a route with `require`; also a refused CORS preflight (OPTIONS)
LIMITED_CODE = 429  # a route with a policy that is not a shadow
# No route: a path it refuses (400), none matched (404), the headers over limits.max_header_* (431), the
# gateway overloaded or draining (503, answered before routing), its own failure (500).
UNMATCHED_CODES = (400, 404, 431, 499, 500, 503)
UNMATCHED_405_METHODS = ("TRACE", "CONNECT")  # refused with 405 when no route lists them
# Refused by the HTTP parser (http_edge.protocol_error), and extension methods no route takes (404).
PARSER_CODES = (400, 404, 408, 414, 431, 500, 501, 505)

# The latency panels' histogram at 0 for the 5xx of each route and method only: 18 series a label set, and
# the failures are where the first latency matters (an upstream timing out, a gateway overloaded); the 4xx
# the gateway answers itself are quick refusals, and the requests counters show those from the first one.
DURATION_CLASS = "5xx"

UPSTREAM_FAILURES: tuple[str, ...] = get_args(FailureKind)  # connect, timeout, reset, protocol

WS_DIRECTIONS = ("to_upstream", "to_client")
# Who ended a stream and with which code (ws_relay.Relay): the codes the gateway sends or records itself,
# and the usual ones from peers (application codes are too many to list: they start at 1 as before).
WS_CLOSES: tuple[tuple[str, int], ...] = (
    ("client", NORMAL),
    ("client", GOING_AWAY),
    ("client", ABNORMAL),
    ("upstream", NORMAL),
    ("upstream", GOING_AWAY),
    ("upstream", ABNORMAL),
    ("upstream", INTERNAL_ERROR),
    ("gateway", GOING_AWAY),  # shutdown, reload
    ("gateway", WSCloseCode.PROTOCOL_ERROR),  # a frame aiohttp refused
    ("gateway", ABNORMAL),  # the relay failed
    ("gateway", WSCloseCode.INVALID_TEXT),
    ("gateway", MESSAGE_TOO_BIG),
    ("gateway", INTERNAL_ERROR),  # send_timeout
)

# gateway_auth_total reasons (ctx.auth's second part), by what the config switches on.
_SOURCE_KINDS = {
    "authorization_header": "jwt",
    "query_token": "jwt",
    "cookie_token": "jwt",
    "query_accesskey": "accesskey",
    "cookie_accesskey": "accesskey",
}
"""Credential source (auth.sources) → kind (auth.credentials.CredentialKind)."""
# Read before a credential's kind is known (credentials.extract): counted with credential_type "none".
_EXTRACT_FAILURES = ("conflicting_credentials",)
# Screened per credential (credentials.MalformedCredential): counted with the kind presented.
_SCREEN_FAILURES = ("too_large", "malformed")
# jwt_verifier.py, with keys configured; the optional checks are added where their setting asks for them.
_JWT_FAILURES = (
    "malformed",
    "empty_signature",
    "alg_not_allowed",
    "forbidden_header",
    "unsupported_crit",
    "kid_too_long",
    "bad_signature",
    "claim_types",
    "expired",
    "not_yet_valid",
)
# key_stores.AccessKeyVerifier and access_keys.KeyRecord, with a redis or file store.
_KEY_FAILURES = ("malformed_key", "unknown_key", "revoked", "expired", "record_identifiers")
# What a successful or forbidden identity's credential_type can be (metrics.credential_type_label).
_IDENTITY_TYPES = (*sorted(metrics.KNOWN_CREDENTIAL_TYPES), "other")


def zero_known_series(config: GatewayConfig, routes: Iterable[Route]) -> None:
    """Create, at 0, every series `known_series` names. Idempotent: an existing series keeps its value."""
    for metric, label_sets in known_series(config, routes).items():
        for labels in label_sets:
            metric.labels(*labels)


def known_series(config: GatewayConfig, routes: Iterable[Route]) -> dict[Any, LabelSets]:
    """Metric → the label sets this config can produce for it (label values in the metric's order)."""
    routes = tuple(routes)
    requests = request_labels(config, routes)
    by_route = {(route.name,) for route in routes}
    streams = {(route.name,) for route in routes if route.websocket}
    pools = config.upstream_pools
    return {
        metrics.REQUESTS: requests,
        metrics.REQUEST_DURATION: {
            (r, m, cls) for r, m, c in requests if (cls := metrics.code_class(int(c))) == DURATION_CLASS
        },
        metrics.REQUEST_BYTES: by_route | {(metrics.UNMATCHED,)},
        metrics.RESPONSE_BYTES: by_route | {(metrics.UNMATCHED,)},
        metrics.UPSTREAM_DURATION: by_route,
        metrics.UPSTREAM_ERRORS: upstream_error_labels(routes),
        metrics.AUTH: auth_labels(config, routes),
        metrics.RATELIMIT: ratelimit_labels(config, routes),
        metrics.WEBSOCKET_CONNECTIONS: streams,
        metrics.WEBSOCKET_MESSAGES: {(r, d) for (r,) in streams for d in WS_DIRECTIONS},
        metrics.WEBSOCKET_BYTES: {(r, d) for (r,) in streams for d in WS_DIRECTIONS},
        metrics.WEBSOCKET_CLOSES: {
            (r, by, metrics.close_code_label(code)) for (r,) in streams for by, code in WS_CLOSES
        },
        metrics.WEBSOCKET_DURATION: streams,
        metrics.TARGET_FAILURES: {
            (name, target.url, kind)
            for name, pool in pools.items()
            for target in pool.targets
            for kind in UPSTREAM_FAILURES
        },
    }


def request_labels(config: GatewayConfig, routes: Iterable[Route]) -> LabelSets:
    """(route, method, code) of gateway_requests_total for the statuses the gateway answers by itself."""
    cors = _cors_routes(config)
    labels: LabelSets = set()
    for route in routes:
        codes = set(ROUTE_CODES)
        if route.auth != "none":
            codes.add(AUTH_CODE)
            if route.require.credential_types or route.require.claims:
                codes.add(FORBIDDEN_CODE)
        if any(not config.rate_limit.policies[p].shadow for p in _policies(route)):
            codes.add(LIMITED_CODE)
        methods = sorted(route.methods) if route.methods is not None else ANY_METHODS
        labels |= {(route.name, method, str(code)) for method in methods for code in codes}
        if cors.get(route.name, False):
            labels.add((route.name, "OPTIONS", str(FORBIDDEN_CODE)))
    unmatched = metrics.UNMATCHED
    labels |= {(unmatched, m, str(c)) for m in ANY_METHODS for c in UNMATCHED_CODES}
    labels |= {(unmatched, m, "405") for m in UNMATCHED_405_METHODS}
    labels |= {(unmatched, PARSER_METHOD, str(c)) for c in PARSER_CODES}
    if config.cors.allow_origins:  # preflights for paths no route takes are answered by the global policy
        labels.add((unmatched, "OPTIONS", str(FORBIDDEN_CODE)))
    return labels


def upstream_error_labels(routes: Iterable[Route]) -> LabelSets:
    """(route, kind): every failure kind on every route; `ejected` only with a pool, `pool_full` only on
    WebSocket routes (their streams' cap)."""
    labels: LabelSets = set()
    for route in routes:
        kinds = [*UPSTREAM_FAILURES]
        if route.pool is not None:
            kinds.append("ejected")
        if route.websocket:
            kinds.append("pool_full")
        labels |= {(route.name, kind) for kind in kinds}
    return labels


def ratelimit_labels(config: GatewayConfig, routes: Iterable[Route]) -> LabelSets:
    """(policy, decision) for the policies some route applies: allowed, and limited (shadow_limited for a
    shadow policy); fallback for a shared policy when Redis is configured (without it, nothing falls back)."""
    policies = config.rate_limit.policies
    labels: LabelSets = set()
    for name in {name for route in routes for name in _policies(route)}:
        policy = policies[name]
        labels.add((name, "allowed"))
        labels.add((name, "shadow_limited" if policy.shadow else "limited"))
        if policy.scope == "shared" and config.redis.url:
            labels.add((name, "fallback"))
    return labels


def auth_labels(config: GatewayConfig, routes: Iterable[Route]) -> LabelSets:
    """(result, reason, credential_type) for the outcomes filters/auth.py can record with this config: the
    checks of the verifiers it builds (auth/setup.py), for the credential kinds its sources read."""
    checked = [route for route in routes if route.auth != "none"]
    if not checked:
        return set()
    auth = config.auth
    labels: LabelSets = set()
    if any(route.auth == "required" for route in checked):
        labels.add(("failure", "no_credential", "none"))
    if any(route.auth == "optional" for route in checked):
        labels.add(("anonymous", "no_credential", "none"))
    sources = [name for name in _SOURCE_KINDS if getattr(auth.sources, name)]
    if not sources:
        return labels
    extract = [*_EXTRACT_FAILURES, *(f"empty_{source}" for source in sources)]
    if auth.sources.authorization_header:
        extract.append("unsupported_scheme")
    labels |= {("failure", reason, "none") for reason in extract}
    for kind in sorted({_SOURCE_KINDS[source] for source in sources}):
        failures, unavailable = _verifier_checks(config, kind)
        labels |= {("failure", reason, kind) for reason in failures}
        labels |= {("unavailable", what, kind) for what in unavailable}
    labels |= {("success", "ok", kind) for kind in _IDENTITY_TYPES}
    if any(route.require.credential_types or route.require.claims for route in checked):
        labels |= {("forbidden", "requirements", kind) for kind in _IDENTITY_TYPES}
    return labels


def _verifier_checks(config: GatewayConfig, kind: str) -> tuple[set[str], set[str]]:
    """(failure reasons, unavailable verifiers) for one credential kind."""
    auth = config.auth
    # no_*_verifier: none is configured, or the credential is in the gateway's key format, which is never
    # introspected.
    failures = {*_SCREEN_FAILURES, f"no_{kind}_verifier"}
    unavailable: set[str] = set()
    stores = set(auth.access_keys.stores)
    if kind == "jwt":
        jwt = auth.jwt
        if jwt.keys:
            failures.update(_JWT_FAILURES)
            if jwt.require_expiry:
                failures.add("missing_expiry")
            if jwt.issuer is not None:
                failures.add("issuer")
            if jwt.audience:
                failures.add("audience")
            if jwt.max_age is not None:
                failures |= {"missing_iat", "too_old"}
            if any(key.jwks_url for key in jwt.keys):
                unavailable.add("jwks")
        introspected = auth.introspect.jwt
    else:
        if stores & {"redis", "file"}:
            failures.update(_KEY_FAILURES)
            unavailable.add("key_store")
        introspected = "introspect" in stores
    if introspected:
        failures.add("introspection_rejected")
        unavailable.add("introspection")
    return failures, unavailable


def _policies(route: Route) -> tuple[str, ...]:
    return (*route.rate_limit_before_auth, *route.rate_limit_after_auth)


def _cors_routes(config: GatewayConfig) -> Mapping[str, bool]:
    """Route name → whether its CORS policy (its own, else the global one) allows some origin."""
    return {
        route.name: bool((route.cors if route.cors is not None else config.cors).allow_origins)
        for route in config.routes
    }
