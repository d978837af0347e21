"""The ordered route table: which route (and so which upstream and policies) a request belongs to.

Pure: config in, `Route` objects out; matching works on the request path alone.

One path, one meaning: routes match the path as an upstream could read it (percent-escapes decoded, one
trailing slash ignored, letter case ignored unless a route is `case_sensitive`), and targets that upstreams
read in different ways are refused. So no spelling of a route's paths reaches a route listed after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.config import GatewayConfig, RouteConfig, RouteRequirements
from gateway.path_rewrite import PrefixRewrite

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_OPEN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""What a route without `methods` takes, in an Allow header; any extension method too, but never TRACE,
which echoes the request (credentials included) back: a route must list it to take it."""
# Control characters, backslashes (read as "/" by some servers), ";" (path parameters that servers such as
# Spring or Tomcat strip before routing, so "/billing;x" would reach a route we did not match), and, once
# decoded, "?" and "#" (servers that decode before splitting off the query would end the path there).
_UNROUTABLE_CHARS = re.compile(r"[\x00-\x1f\x7f\\;?#]")


@dataclass(frozen=True, slots=True)
class Route:
    """A route with every inherited setting resolved, so the request path never looks at defaults."""

    name: str
    template: str
    """The route's prefix or path as configured."""
    prefix: bool
    pattern: re.Pattern[str]
    case_sensitive: bool
    methods: frozenset[str] | None
    upstream: str
    """The one upstream URL of a route without a pool; "" with one."""
    pool: str | None
    """The upstream pool each attempt picks a target from (upstream_pools), or None."""
    preserve_host: bool
    connect_timeout: float
    response_headers_timeout: float
    idle_read_timeout: float
    request_body_idle_timeout: float
    max_body_bytes: int
    min_body_rate: int
    min_body_rate_grace: float
    request_buffer_bytes: int
    websocket: bool
    max_message_bytes: int
    """The largest WebSocket message relayed either way; 0: no limit."""
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
    rewrite: PrefixRewrite | None
    """strip_prefix / rewrite_prefix resolved; None leaves the target as the client sent it."""

    def allows(self, method: str) -> bool:
        return method != "TRACE" if self.methods is None else method in self.methods


class BadPath(ValueError):
    """A request target the gateway refuses to route (it could be read differently upstream)."""


def compile_routes(config: GatewayConfig) -> tuple[Route, ...]:
    return tuple(_compile(route, config) for route in config.routes)


def _compile(route: RouteConfig, config: GatewayConfig) -> Route:
    up = config.upstream
    pool = route.pool or (up.pool_name if route.upstream is None else None)
    timeouts = route.timeouts
    limits = config.limits
    return Route(
        name=route.name,
        template=route.prefix if route.prefix is not None else route.path or "",
        prefix=route.prefix is not None,
        pattern=_pattern(route),
        case_sensitive=route.case_sensitive,
        # HEAD is GET without the body (RFC 9110 §9.3.2): upstreams serve it with the GET handler.
        methods=frozenset(route.methods) | ({"HEAD"} if "GET" in route.methods else set()) or None,
        upstream="" if pool else route.upstream or up.url,
        pool=pool,
        preserve_host=up.preserve_host if route.preserve_host is None else route.preserve_host,
        connect_timeout=timeouts.connect or up.timeouts.connect,
        response_headers_timeout=timeouts.response_headers or up.timeouts.response_headers,
        idle_read_timeout=timeouts.idle_read or up.timeouts.idle_read,
        request_body_idle_timeout=timeouts.request_body_idle or up.timeouts.request_body_idle,
        max_body_bytes=int(limits.max_body_bytes if route.max_body_bytes is None else route.max_body_bytes),
        min_body_rate=int(limits.min_body_rate if route.min_body_rate is None else route.min_body_rate),
        min_body_rate_grace=limits.min_body_rate_grace,
        request_buffer_bytes=int(
            up.request_buffer_bytes if route.request_buffer_bytes is None else route.request_buffer_bytes
        ),
        websocket=route.websocket,
        max_message_bytes=int(
            config.websocket.max_message_bytes if route.max_message_bytes is None else route.max_message_bytes
        ),
        retries=up.retries,
        auth=route.auth,
        hide_credentials=route.hide_credentials,
        require=route.require,
        rate_limit_before_auth=tuple(n for n in route.rate_limit if _before_auth(config, route, n)),
        rate_limit_after_auth=tuple(n for n in route.rate_limit if not _before_auth(config, route, n)),
        cost=route.cost,
        rewrite=_rewrite(route),
    )


def _rewrite(route: RouteConfig) -> PrefixRewrite | None:
    if route.prefix is None or not (route.strip_prefix or route.rewrite_prefix is not None):
        return None
    # Both without a trailing slash, as the prefix matches: "/api/" + "/v1.0/" never doubles one.
    return PrefixRewrite(len(route.prefix.rstrip("/")), (route.rewrite_prefix or "").rstrip("/"))


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
    # IGNORECASE also matches the letters that upstreams fold onto ASCII ones (the Kelvin sign, a long s).
    flags = re.DOTALL | (0 if route.case_sensitive else re.IGNORECASE)
    if route.prefix is not None:
        prefix = route.prefix.rstrip("/")
        # Segment-aware: "/auth" matches "/auth" and "/auth/login", never "/authz".
        return re.compile(re.escape(prefix) + r"(?:/.*)?" if prefix else r"/.*", flags)
    assert route.path is not None
    return re.compile(template_regex(route.path.rstrip("/") or "/"), flags)


def template_regex(template: str) -> str:
    """A path template as a regex: `{name}` is one segment (at least one character), the rest literal."""
    parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", template)
    return "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)


class RouteTable:
    __slots__ = ("_routes", "allow")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)
        self.allow = _allow(self._routes)
        """Every method some route takes: the Allow header of `OPTIONS *`."""

    def allowed(self, path: str) -> str:
        """The methods some route takes a path from routable_path with, as an Allow header."""
        return _allow(route for route in self._routes if route.pattern.fullmatch(path))

    def match(self, path: str, method: str) -> Route | None:
        """The first route for a path from routable_path."""
        for route in self._routes:
            if route.pattern.fullmatch(path) and route.allows(method):
                return route
        return None


def _allow(routes: Iterable[Route]) -> str:
    return ", ".join(sorted({m for route in routes for m in (route.methods or _OPEN_METHODS)}))


def routable_path(raw_path: str) -> str:
    """The path as routes match it (decoded, without a trailing slash), or BadPath.

    The request is forwarded byte-exact, so any target the upstream might resolve differently from how we
    matched it (dot segments, encoded ones, empty segments, backslashes, control characters, escapes that
    are not UTF-8) is refused instead.
    """
    if not raw_path.startswith("/"):
        raise BadPath("the request target must be an absolute path")
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        try:
            path = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise BadPath("the request path has percent-escapes that are not UTF-8") from None
    if _UNROUTABLE_CHARS.search(path):
        raise BadPath(
            "the request path contains a backslash, a ';', an encoded '?' or '#', or a control character"
        )
    if "/." in path and any(seg in (".", "..") for seg in path.split("/")):
        raise BadPath("the request path contains '.' or '..' segments")
    if "//" in path:  # servers that merge slashes would route it elsewhere
        raise BadPath("the request path contains an empty segment")
    # Most servers take "/x/" for "/x"; so does the route table.
    return path[:-1] if len(path) > 1 and path[-1] == "/" else path
