"""Rate limiting on the request path: X-RateLimit-* on every response of a limited route, 429 with
Retry-After and the blocking policies when the caller is over a limit."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from gateway.context import RequestContext
from gateway.envelope import gateway_error
from gateway.filters.errors import GatewayError
from gateway.pipeline import Next
from gateway.ratelimit.headers import response_headers, retry_after
from gateway.ratelimit.limiter import Outcome, RateLimiter
from gateway.ratelimit.policies import Caller
from gateway.ratelimit.resilient import is_unavailable


class RateLimitFilter:
    """One of two stages: `before_auth` checks the route's policies keyed by ip and/or route only, so a flood
    of bad credentials is limited before any verification work; the second stage, after authentication,
    checks the policies that need the caller's identity. Each stage is all or nothing; the headers speak
    for both."""

    def __init__(
        self,
        limiter: RateLimiter,
        *,
        before_auth: bool,
        ietf_headers: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._limiter = limiter
        self._before_auth = before_auth
        self._ietf = ietf_headers
        self._clock = clock

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        route = ctx.route
        assert route is not None
        policies = route.rate_limit_before_auth if self._before_auth else route.rate_limit_after_auth
        if not policies:
            return await call_next(request, ctx)
        outcome = await self._limiter.check(
            policies, Caller(ctx.client_ip, ctx.identity, route.name), route.cost
        )
        if outcome is None:
            return await call_next(request, ctx)
        earlier = ctx.rate_limit
        if earlier is not None:  # the first stage admitted; report both stages together
            outcome = Outcome(earlier.checked + outcome.checked, earlier.fell_back or outcome.fell_back)
        ctx.rate_limit = outcome
        decisions = [c.decision for c in outcome.checked]
        ctx.response_headers.update(
            response_headers([c.limit for c in outcome.checked], decisions, self._clock(), ietf=self._ietf)
        )
        blocking = [c for c in outcome.blocking if not is_unavailable(c.decision)]
        if not blocking and outcome.blocking:  # only `closed` policies that Redis could not decide
            raise GatewayError(
                gateway_error(503, "SERVICE_UNAVAILABLE", "Rate limits cannot be checked right now.")
            )
        if blocking:
            details = [{"limited_by": c.policy.limited_by, "policy": c.policy.name} for c in blocking]
            raise GatewayError(
                gateway_error(
                    429,
                    "RATE_LIMIT_EXCEEDED",
                    details=details,
                    headers={"Retry-After": str(retry_after(decisions))},
                )
            )
        return await call_next(request, ctx)
