"""CORS for browsers: preflights answered by the gateway (before admission, authentication and every rate
limit), and the CORS headers of every other answer to a request with an Origin, the gateway's own envelopes
included, put in the request context for whoever answers.

In the chain only when some policy allows an origin (build_cors_filter). It runs before RouteFilter, so it
finds the route's policy itself, the way RouteFilter will find the route: a preflight by its path and the
method it asks about (the route need not take OPTIONS); a path that does not route gets the global policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aiohttp import hdrs, web

from gateway.config import GatewayConfig
from gateway.context import RequestContext
from gateway.cors import VARY_PREFLIGHT, CorsPolicy
from gateway.envelope import gateway_error
from gateway.filters.errors import GatewayError
from gateway.pipeline import Next
from gateway.routing import _OPEN_METHODS, BadPath, Route, RouteTable, routable_path


class CorsFilter:
    def __init__(
        self, table: RouteTable, policies: Mapping[str, CorsPolicy | None], fallback: CorsPolicy | None
    ) -> None:
        self._table = table
        self._policies = policies
        """By route name; None where CORS is off."""
        self._fallback = fallback

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:  # not a cross-origin request from a browser: this lookup is all it costs
            return await call_next(request, ctx)
        asked = None
        if request.method == hdrs.METH_OPTIONS:
            asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD)
        route, policy = self._find(request.raw_path, request.method if asked is None else asked)
        if policy is None:  # CORS is off here: the upstream's own CORS headers pass through
            return await call_next(request, ctx)
        if asked is None:
            ctx.response_headers.update(policy.actual(origin))
            ctx.cors = True
            return await call_next(request, ctx)
        ctx.route = route  # logs and metrics name the route the preflight asked about
        answer = policy.preflight(origin, asked, request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS))
        if answer.refused is not None:
            # An envelope rather than a bare 204: the browser fails the request either way and shows the
            # page nothing, but the developer's network panel, curl, the access log and the metrics see a
            # 403 that says why, instead of a success.
            refusal = gateway_error(
                403, "CORS_NOT_ALLOWED", answer.refused, headers={hdrs.VARY: VARY_PREFLIGHT}
            )
            raise GatewayError(refusal)
        return web.Response(status=204, headers={**ctx.response_headers, **answer.headers})

    def _find(self, raw_path: str, method: str) -> tuple[Route | None, CorsPolicy | None]:
        try:
            path = routable_path(raw_path)
        except BadPath:
            return None, self._fallback
        route = self._table.match(path, method)
        if route is None:
            return None, self._fallback
        return route, self._policies[route.name]


def build_cors_filter(config: GatewayConfig, routes: Sequence[Route]) -> CorsFilter | None:
    """The filter, or None when no policy allows an origin: a gateway without CORS pays nothing for it. A
    route's own `cors` replaces the global section whole."""
    ietf = config.rate_limit.ietf_headers
    own = {route.name: route.cors for route in config.routes}
    fallback = CorsPolicy.compile(config.cors, route_methods=_OPEN_METHODS, ietf_headers=ietf)
    policies: dict[str, CorsPolicy | None] = {}
    for route in routes:
        chosen = own[route.name]
        policies[route.name] = CorsPolicy.compile(
            config.cors if chosen is None else chosen,
            # A route that lists no methods takes any but TRACE: the common ones are what can be listed.
            route_methods=route.methods or _OPEN_METHODS,
            ietf_headers=ietf,
        )
    if fallback is None and all(policy is None for policy in policies.values()):
        return None
    return CorsFilter(RouteTable(routes), policies, fallback)
