"""The outermost filter: after every request, its metrics and one access-log line, both read from the
request context that the filters below filled in (route, identity, auth outcome, rate-limit decisions,
upstream timing). Nothing below it needs to know about metrics or logs."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

import structlog
from aiohttp import web

from gateway.auth.credentials import QUERY_NAMES
from gateway.context import RequestContext, StreamStats
from gateway.observability import metrics
from gateway.observability.redact import redact_target
from gateway.pipeline import Next

log = structlog.get_logger("gateway.observe")

CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


class ObserveFilter:
    def __init__(
        self,
        request_metrics: metrics.RequestMetrics,
        access_log: Any | None,
        *,
        secret_params: Collection[str],
    ) -> None:
        self._metrics = request_metrics
        self._log = access_log
        # The credential parameters are always redacted, whatever the configured list says.
        self._secret_params = frozenset(p.lower() for p in (*secret_params, *QUERY_NAMES))

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        metrics.IN_FLIGHT.inc()
        response: web.StreamResponse | None = None
        try:
            response = await call_next(request, ctx)
            return response
        finally:
            metrics.IN_FLIGHT.dec()
            self._record(request.method, request.raw_path, ctx, response)

    def rejected(self, ctx: RequestContext, response: web.Response) -> None:
        """A request aiohttp's HTTP parser refused before the chain: its metrics and access-log line, with
        no method or path, since neither could be read."""
        self._record(None, None, ctx, response)

    def _record(
        self, method: str | None, target: str | None, ctx: RequestContext, response: web.StreamResponse | None
    ) -> None:
        try:
            self._emit(method, target, ctx, response)
        except Exception:
            # Losing one metric or log line is better than failing a request that already succeeded.
            log.exception("observe_failed", request_id=ctx.request_id)

    def _emit(
        self, method: str | None, target: str | None, ctx: RequestContext, response: web.StreamResponse | None
    ) -> None:
        seconds = time.perf_counter() - ctx.started
        route = ctx.route.name if ctx.route is not None else metrics.UNMATCHED
        status = answered_status(ctx, response)
        stream = ctx.stream
        # A stream's latency is its handshake's; its length is logged as duration_ms.
        latency = stream.opened - ctx.started if stream is not None else seconds
        # A plain Response is sent after the chain returns, so its size is its declared length; a streamed
        # one was counted as it went (also when it was cut short).
        bytes_out = (response.content_length or 0) if isinstance(response, web.Response) else ctx.bytes_out
        trace = ctx.trace
        # An exemplar only for a trace that is being exported: a link to one that is not would lead nowhere.
        exemplar = trace.trace_id if trace is not None and trace.recorded else None
        self._metrics.request(route, method or "", status, latency, ctx.bytes_in, bytes_out, exemplar)
        if ctx.upstream_seconds is not None:
            self._metrics.upstream(route, ctx.upstream_seconds, exemplar)
        if ctx.upstream_error is not None:
            self._metrics.upstream_error(route, ctx.upstream_error)
        identity = ctx.identity
        if ctx.auth is not None:
            # A failed check has no identity, but the kind of credential it rejected is still telling.
            self._metrics.auth(*ctx.auth, identity.credential_type if identity else ctx.credential_kind)
        outcome = ctx.rate_limit
        if outcome is not None:
            for checked in outcome.checked:
                verdict = checked.verdict
                if verdict != "unavailable":  # counted as a fallback where it happened
                    self._metrics.ratelimit(checked.policy.name, verdict)
        if self._metrics.teams_enabled and identity is not None and identity.team_id:
            self._metrics.team(identity.team_id)
        if self._log is not None:
            self._access_log(method, target, ctx, route, status, seconds, bytes_out)

    def _access_log(
        self,
        method: str | None,
        target: str | None,
        ctx: RequestContext,
        route: str,
        status: int,
        seconds: float,
        bytes_out: int,
    ) -> None:
        identity = ctx.identity
        outcome = ctx.rate_limit
        worst = outcome.worst() if outcome is not None else None
        trace = ctx.trace
        self._log.info(
            "request",
            request_id=ctx.request_id,
            trace_id=trace.trace_id if trace is not None else None,
            span_id=trace.span_id if trace is not None else None,
            method=method,
            route=route,
            path=redact_target(target, self._secret_params) if target is not None else None,
            status=status,
            reason=ctx.error_reason,
            duration_ms=round(seconds * 1000, 3),
            upstream_ms=round(ctx.upstream_seconds * 1000, 3) if ctx.upstream_seconds is not None else None,
            bytes_in=ctx.bytes_in,
            bytes_out=bytes_out,
            client_ip=ctx.client_ip,
            customer_id=identity.customer_id if identity else None,
            team_id=identity.team_id if identity else None,
            credential_type=identity.credential_type if identity else None,
            auth=ctx.auth[0] if ctx.auth else None,
            auth_check=ctx.auth[1] if ctx.auth else None,
            ratelimit=worst.verdict if worst is not None else None,
            ratelimit_policy=worst.policy.name if worst is not None and worst.verdict != "allowed" else None,
            ratelimit_fallback=outcome.fell_back if outcome is not None else None,
            upstream_error=ctx.upstream_error,
            upstream_target=ctx.upstream_target,
            **(_stream_fields(ctx.stream) if ctx.stream is not None else {}),
        )


def answered_status(ctx: RequestContext, response: web.StreamResponse | None) -> int:
    """The status the client got: 101 for an upgraded stream however it ended (its handler is cancelled
    when the client's connection is lost), 499 when the client left before any answer."""
    if ctx.stream is not None:
        return 101
    return response.status if response is not None else CLIENT_CLOSED


def _stream_fields(stream: StreamStats) -> dict[str, Any]:
    """A WebSocket's line also says how the stream went; its bytes are bytes_in (client to upstream) and
    bytes_out."""
    return {
        "ws_messages_in": stream.messages_in,
        "ws_messages_out": stream.messages_out,
        "ws_closed_by": stream.closed_by,
        "ws_close_code": stream.close_code,
        "ws_close_reason": stream.close_reason,
    }
