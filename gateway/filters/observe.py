"""The outermost filter: after every request, its metrics and one access-log line, both read from the
request context that the filters below filled in (route, identity, auth outcome, rate-limit decisions,
upstream timing). Nothing below it needs to know about metrics or logs."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import structlog
from aiohttp import web

from gateway.auth.credentials import QUERY_NAMES
from gateway.context import RequestContext
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
            try:
                self._record(request, ctx, response)
            except Exception:
                # Losing one metric or log line is better than failing a request that already succeeded.
                log.exception("observe_failed", request_id=ctx.request_id)

    def _record(
        self, request: web.BaseRequest, ctx: RequestContext, response: web.StreamResponse | None
    ) -> None:
        seconds = asyncio.get_running_loop().time() - ctx.started
        route = ctx.route.name if ctx.route is not None else metrics.UNMATCHED
        status = response.status if response is not None else CLIENT_CLOSED
        # A plain Response is sent after the chain returns, so its size is its declared length; a streamed
        # one was counted as it went (also when it was cut short).
        bytes_out = (response.content_length or 0) if isinstance(response, web.Response) else ctx.bytes_out
        self._metrics.request(route, request.method, status, seconds, ctx.bytes_in, bytes_out)
        if ctx.upstream_seconds is not None:
            self._metrics.upstream(route, ctx.upstream_seconds)
        if ctx.upstream_error is not None:
            self._metrics.upstream_error(route, ctx.upstream_error)
        identity = ctx.identity
        if ctx.auth is not None:
            self._metrics.auth(*ctx.auth, identity.credential_type if identity else None)
        outcome = ctx.rate_limit
        if outcome is not None:
            for checked in outcome.checked:
                decision = checked.decision
                name = "allowed" if decision.allowed else ("shadow_limited" if decision.shadow else "limited")
                self._metrics.ratelimit(checked.policy.name, name)
        if self._metrics.teams_enabled and identity is not None and identity.team_id:
            self._metrics.team(identity.team_id)
        if self._log is not None:
            self._access_log(request, ctx, route, status, seconds, bytes_out)

    def _access_log(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        route: str,
        status: int,
        seconds: float,
        bytes_out: int,
    ) -> None:
        identity = ctx.identity
        outcome = ctx.rate_limit
        blocking = outcome.blocking if outcome is not None else []
        self._log.info(
            "request",
            request_id=ctx.request_id,
            method=request.method,
            route=route,
            path=redact_target(request.raw_path, self._secret_params),
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
            ratelimit=("limited" if blocking else "allowed") if outcome is not None else None,
            ratelimit_policy=blocking[0].policy.name if blocking else None,
            ratelimit_fallback=outcome.fell_back if outcome is not None else None,
            upstream_error=ctx.upstream_error,
        )
