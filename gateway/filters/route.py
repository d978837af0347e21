"""Finds the request's route; refuses paths it will not route and what the route does not take, and answers
`OPTIONS *` (a question about the gateway, not about any route)."""

from __future__ import annotations

from aiohttp import web

from gateway.context import RequestContext
from gateway.envelope import gateway_error
from gateway.filters.errors import GatewayError
from gateway.pipeline import Next
from gateway.routing import BadPath, RouteTable, routable_path


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


class RouteFilter:
    def __init__(self, table: RouteTable) -> None:
        self._table = table

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        raw_path = request.raw_path
        if raw_path == "*":  # only OPTIONS gets this far with it (http_conformance)
            return web.Response(headers={**ctx.response_headers, "Allow": self._table.allow})
        if request.method == "CONNECT":  # a tunnel, which a reverse proxy does not open, to any path
            raise GatewayError(
                gateway_error(
                    405,
                    "METHOD_NOT_ALLOWED",
                    "CONNECT is not served.",
                    # What follows on the connection would be tunnel bytes: none of it is read as requests.
                    headers={"Allow": self._table.allow, "Connection": "close"},
                )
            )
        try:
            path = routable_path(raw_path)
        except BadPath as exc:
            raise GatewayError(
                gateway_error(400, "INVALID_ARGUMENT", f"Invalid request path: {exc}.")
            ) from None
        route = self._table.match(path, request.method)
        if route is None:
            if request.method == "TRACE":
                raise GatewayError(
                    gateway_error(
                        405,
                        "METHOD_NOT_ALLOWED",
                        "TRACE is not allowed here.",
                        headers={"Allow": self._table.allowed(path)},
                    )
                )
            raise GatewayError(
                gateway_error(404, "ROUTE_NOT_FOUND", f"No route for {request.method} {path[:200]}.")
            )
        ctx.route = route
        if route.rewrite is not None:  # once, here: the filters below and the proxies read ctx.target
            ctx.target = route.rewrite.apply(ctx.target)
        if is_websocket_upgrade(request) and not route.websocket:
            raise GatewayError(
                gateway_error(400, "INVALID_ARGUMENT", "WebSocket upgrades are not allowed on this route.")
            )
        length = request.content_length
        if length is not None and length > route.max_body_bytes:
            raise GatewayError(
                gateway_error(
                    413, "REQUEST_TOO_LARGE", f"The request body exceeds {route.max_body_bytes} bytes."
                )
            )
        return await call_next(request, ctx)
