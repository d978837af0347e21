"""The ordered route table: which route (and so which upstream and policies) a request belongs to.

Pure: config in, `Route` objects out; matching works on the request path alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.config import GatewayConfig, RouteConfig, RouteRequirements

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Control characters, backslashes (read as "/" by some servers) and ";" (path parameters that servers such
# as Spring or Tomcat strip before routing, so "/billing;x" would reach a route we did not match).
_UNROUTABLE_CHARS = re.compile(r"[\x00-\x1f\x7f\\;]")


@dataclass(frozen=True, slots=True)
class Route:
    """A route with every inherited setting resolved, so the request path never looks at defaults."""

    name: str
    pattern: re.Pattern[str]
    methods: frozenset[str] | None
    upstream: str
    preserve_host: bool
    connect_timeout: float
    response_headers_timeout: float
    idle_read_timeout: float
    request_body_idle_timeout: float
    max_body_bytes: int
    websocket: bool
    retries: int
    auth: str
    """required, optional or none"""
    hide_credentials: bool
    require: RouteRequirements
    rate_limit_before_auth: tuple[str, ...]
    """Policies keyed by ip and/or route only, checked before authentication does any work (see
    _before_auth for which)."""
    rate_limit_after_auth: tuple[str, ...]
    """Policies that need the caller's identity."""
    cost: int

    def allows(self, method: str) -> bool:
        return self.methods is None or method in self.methods


class BadPath(ValueError):
    """A request target the gateway refuses to route (it could be read differently upstream)."""


def compile_routes(config: GatewayConfig) -> tuple[Route, ...]:
    return tuple(_compile(route, config) for route in config.routes)


def _compile(route: RouteConfig, config: GatewayConfig) -> Route:
    up = config.upstream
    timeouts = route.timeouts
    return Route(
        name=route.name,
        pattern=_pattern(route),
        methods=frozenset(route.methods) or None,
        upstream=route.upstream or up.url,
        preserve_host=up.preserve_host if route.preserve_host is None else route.preserve_host,
        connect_timeout=timeouts.connect or up.timeouts.connect,
        response_headers_timeout=timeouts.response_headers or up.timeouts.response_headers,
        idle_read_timeout=timeouts.idle_read or up.timeouts.idle_read,
        request_body_idle_timeout=timeouts.request_body_idle or up.timeouts.request_body_idle,
        max_body_bytes=int(
            config.limits.max_body_bytes if route.max_body_bytes is None else route.max_body_bytes
        ),
        websocket=route.websocket,
        retries=up.retries,
        auth=route.auth,
        hide_credentials=route.hide_credentials,
        require=route.require,
        rate_limit_before_auth=tuple(n for n in route.rate_limit if _before_auth(config, route, n)),
        rate_limit_after_auth=tuple(n for n in route.rate_limit if not _before_auth(config, route, n)),
        cost=route.cost,
    )


def _before_auth(config: GatewayConfig, route: RouteConfig, name: str) -> bool:
    """Checked before authentication: policies that need no identity and cost no extra Redis round trip,
    i.e. in-process ones, or shared ones on a route without identity policies. Shared ones beside identity
    policies ride in the identity stage's single script call instead."""
    policies = config.rate_limit.policies

    def anonymous(policy: str) -> bool:
        return set(policies[policy].key) <= {"ip", "route"}

    if not anonymous(name):
        return False
    return policies[name].scope == "local" or all(anonymous(other) for other in route.rate_limit)


def _pattern(route: RouteConfig) -> re.Pattern[str]:
    if route.prefix is not None:
        prefix = route.prefix.rstrip("/")
        # Segment-aware: "/auth" matches "/auth" and "/auth/login", never "/authz".
        return re.compile(re.escape(prefix) + r"(?:/.*)?" if prefix else r"/.*", re.DOTALL)
    assert route.path is not None
    parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", route.path)
    regex = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
    return re.compile(regex)


class RouteTable:
    __slots__ = ("_routes",)

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)

    def match(self, path: str, method: str) -> Route | None:
        for route in self._routes:
            if route.pattern.fullmatch(path) and route.allows(method):
                return route
        return None


def routable_path(raw_path: str) -> str:
    """The decoded path used for matching, or BadPath.

    The request is forwarded byte-exact, so any target the upstream might resolve differently from how we
    matched it (dot segments, encoded ones, backslashes, control characters) is refused instead.
    """
    if not raw_path.startswith("/"):
        raise BadPath("the request target must be an absolute path")
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = unquote(path, errors="replace")
    if _UNROUTABLE_CHARS.search(path):
        raise BadPath("the request path contains a backslash, a ';' or a control character")
    if "/." in path and any(seg in (".", "..") for seg in path.split("/")):
        raise BadPath("the request path contains '.' or '..' segments")
    if "//" in path:  # servers that merge slashes would route it elsewhere
        raise BadPath("the request path contains an empty segment")
    return path
