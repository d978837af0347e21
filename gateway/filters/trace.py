"""The gateway's server span for a request whose trace is sampled, when tracing exports spans: started
right inside `observe`, so it covers the rest of the chain, with what the filters below learnt about the
request (route, caller, auth and rate-limit outcome, status). The trace context itself is set before the
chain for every request (trace_context.Propagation).

Never a credential on a span: the path goes without its query (where access keys travel), and the caller
is named by its ids, never by what it presented."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway.context import RequestContext
from gateway.filters.observe import answered_status
from gateway.observability import spans
from gateway.observability.metrics import KNOWN_METHODS
from gateway.observability.trace_context import TRACEPARENT
from gateway.pipeline import Next

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracer

log = structlog.get_logger("gateway.trace")


class ServerSpanFilter:
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        trace = ctx.trace
        if trace is None or not trace.sampled:
            return await call_next(request, ctx)
        tracer = self._tracer
        method = _method(request.method)
        started = tracer.start_server_span(trace, method, _request_attributes(request, ctx))
        if started is None:
            return await call_next(request, ctx)
        ctx.upstream_header_overrides[TRACEPARENT] = trace.traceparent()  # now naming the server span
        span, token = started
        response: web.StreamResponse | None = None
        try:
            response = await call_next(request, ctx)
            return response
        finally:
            try:
                _describe(span, method, ctx, answered_status(ctx, response))
            except Exception:  # a span missing an attribute is better than a request failed for it
                log.exception("trace_span_failed", request_id=ctx.request_id)
            tracer.end_server_span(span, token)


def _method(method: str) -> str:
    """The method in a span's name: any token is a method, and names must stay few (OpenTelemetry's rule:
    HTTP for one it does not know; the attributes keep it as http.request.method_original)."""
    return method if method in KNOWN_METHODS else "HTTP"


def _request_attributes(request: web.BaseRequest, ctx: RequestContext) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": request.method if request.method in KNOWN_METHODS else "_OTHER",
        "url.path": request.raw_path.partition("?")[0],
        "url.scheme": request.scheme,
        "gateway.request_id": ctx.request_id,
    }
    if request.method not in KNOWN_METHODS:
        attributes["http.request.method_original"] = request.method
    if ctx.client_ip is not None:
        attributes["client.address"] = ctx.client_ip
    return attributes


def _describe(span: Any, method: str, ctx: RequestContext, status: int) -> None:
    """What the request turned out to be, read from the context the filters below filled in (set at once:
    each set_attribute takes the span's lock)."""
    attributes: dict[str, Any] = {"http.response.status_code": status}
    route = ctx.route
    if route is not None:
        span.update_name(f"{method} {route.template}")
        attributes["http.route"] = route.template
        attributes["gateway.route"] = route.name
    identity = ctx.identity
    if identity is not None:
        for key, value in (
            ("gateway.customer_id", identity.customer_id),
            ("gateway.team_id", identity.team_id),
            ("gateway.credential_type", identity.credential_type),
        ):
            if value:
                attributes[key] = value
    if ctx.auth is not None:
        attributes["gateway.auth.result"], attributes["gateway.auth.reason"] = ctx.auth
    outcome = ctx.rate_limit
    if outcome is not None:
        worst = outcome.worst()
        attributes["gateway.ratelimit.decision"] = worst.verdict
        attributes["gateway.ratelimit.policy"] = worst.policy.name
        attributes["gateway.ratelimit.fallback"] = outcome.fell_back
    if ctx.upstream_target is not None:
        attributes["gateway.upstream.target"] = ctx.upstream_target
    span.set_attributes(attributes)
    if status >= 500:  # a server span's error is the server's: 4xx are the client's (OpenTelemetry's rule)
        spans.failed(span, ctx.upstream_error or ctx.error_reason or str(status))
