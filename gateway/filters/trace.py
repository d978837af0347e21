"""The request's trace: the caller's W3C trace context continued (or a trace started), the upstream told
which span it answers to, and, when tracing exports and the trace is sampled, the gateway's server span with
what the filters below learnt about the request (route, caller, auth and rate-limit outcome, status).

Never a credential on a span: the path goes without its query (where access keys travel), and the caller
is named by its ids, never by what it presented."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway.config import TracingConfig
from gateway.context import RequestContext
from gateway.filters.observe import answered_status
from gateway.observability import spans
from gateway.observability.trace_context import TRACEPARENT, TRACESTATE, HeadSampler, continue_or_start
from gateway.pipeline import Next

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracer

log = structlog.get_logger("gateway.trace")

_NONE: tuple[str, ...] = ()


class TraceFilter:
    def __init__(self, tracer: Tracer | None, sampler: HeadSampler, *, trust_inbound: bool) -> None:
        self._tracer = tracer
        self._sample = sampler
        self._trust = trust_inbound

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        headers = request.headers
        # getall only when present: most requests carry no trace context, and get() is the cheaper miss.
        traceparent = headers.getall(TRACEPARENT) if TRACEPARENT in headers else _NONE
        tracestate = headers.getall(TRACESTATE) if traceparent and TRACESTATE in headers else _NONE
        trace = ctx.trace = continue_or_start(
            traceparent, tracestate, self._sample, trust_inbound=self._trust
        )
        tracer = self._tracer
        if tracer is None or not trace.sampled:
            self._propagate(ctx)
            return await call_next(request, ctx)
        span, token = tracer.start_server_span(trace, request.method, _request_attributes(request, ctx))
        self._propagate(ctx)
        response: web.StreamResponse | None = None
        try:
            response = await call_next(request, ctx)
            return response
        finally:
            try:
                _describe(span, request.method, ctx, answered_status(ctx, response))
            except Exception:  # a span missing an attribute is better than a request failed for it
                log.exception("trace_span_failed", request_id=ctx.request_id)
            tracer.end_server_span(span, token)

    @staticmethod
    def _propagate(ctx: RequestContext) -> None:
        trace = ctx.trace
        assert trace is not None
        overrides = ctx.upstream_header_overrides
        overrides[TRACEPARENT] = trace.traceparent()
        overrides[TRACESTATE] = trace.state  # None: a client's tracestate does not go on without its parent


def build_trace_filter(config: TracingConfig, tracer: Tracer | None) -> TraceFilter | None:
    if not config.propagate:
        return None
    return TraceFilter(tracer, HeadSampler(config.sample_ratio), trust_inbound=config.trust_inbound)


def _request_attributes(request: web.BaseRequest, ctx: RequestContext) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": request.method,
        "url.path": request.raw_path.partition("?")[0],
        "url.scheme": request.scheme,
        "gateway.request_id": ctx.request_id,
    }
    if ctx.client_ip is not None:
        attributes["client.address"] = ctx.client_ip
    return attributes


def _describe(span: Any, method: str, ctx: RequestContext, status: int) -> None:
    """What the request turned out to be, read from the context the filters below filled in."""
    route = ctx.route
    if route is not None:
        span.update_name(f"{method} {route.template}")
        span.set_attribute("http.route", route.template)
        span.set_attribute("gateway.route", route.name)
    span.set_attribute("http.response.status_code", status)
    identity = ctx.identity
    if identity is not None:
        for key, value in (
            ("gateway.customer_id", identity.customer_id),
            ("gateway.team_id", identity.team_id),
            ("gateway.credential_type", identity.credential_type),
        ):
            if value:
                span.set_attribute(key, value)
    if ctx.auth is not None:
        span.set_attribute("gateway.auth.result", ctx.auth[0])
        span.set_attribute("gateway.auth.reason", ctx.auth[1])
    outcome = ctx.rate_limit
    if outcome is not None:
        worst = outcome.worst()
        span.set_attribute("gateway.ratelimit.decision", worst.verdict)
        span.set_attribute("gateway.ratelimit.policy", worst.policy.name)
        span.set_attribute("gateway.ratelimit.fallback", outcome.fell_back)
    if ctx.upstream_target is not None:
        span.set_attribute("gateway.upstream.target", ctx.upstream_target)
    if status >= 500:  # a server span's error is the server's: 4xx are the client's (OpenTelemetry's rule)
        spans.failed(span, ctx.upstream_error or ctx.error_reason or str(status))
    elif ctx.error_reason is not None:
        span.set_attribute("error.type", ctx.error_reason)
