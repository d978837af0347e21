"""Rate limiting on the request path: X-RateLimit-* on every response of a limited route, 429 with
Retry-After and the blocking policies when the caller is over a limit."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NoReturn

from aiohttp import web

from gateway.context import RequestContext
from gateway.envelope import gateway_error
from gateway.filters.errors import GatewayError
from gateway.pipeline import Next
from gateway.ratelimit.headers import cost_exceeds_limit, pair_headers, retry_after
from gateway.ratelimit.ip_prefix import IpPrefixes
from gateway.ratelimit.limiter import Checked, Outcome, RateLimiter
from gateway.ratelimit.policies import Caller

_NEVER_PASSES = "This request costs more than a limit allows; it cannot pass until that limit is raised."


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
        ip_prefixes: IpPrefixes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._limiter = limiter
        self._ip_key = ip_prefixes.key
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
        client_ip = ctx.client_ip
        ip = None if client_ip is None else self._ip_key(client_ip)
        outcome = await self._limiter.check(policies, Caller(ip, ctx.identity, route.name), route.cost)
        if outcome is None:
            return await call_next(request, ctx)
        earlier = ctx.rate_limit
        if earlier is not None:  # the first stage admitted; report both stages together
            if outcome.blocking:
                # All or nothing across the stages: a request refused here must not keep using up the
                # first stage's IP limits (other customers behind that IP would pay for it).
                self._limiter.refund(earlier)
            outcome = Outcome(earlier.checked + outcome.checked, earlier.fell_back or outcome.fell_back)
        ctx.rate_limit = outcome
        checked = outcome.checked
        pairs = [(c.limit, c.decision) for c in checked]
        ctx.response_headers.update(pair_headers(pairs, self._clock(), ietf=self._ietf))
        for c in checked:
            if c.decision.enforced_reject:
                self._refuse(checked)
        return await call_next(request, ctx)

    @staticmethod
    def _refuse(checked: tuple[Checked, ...]) -> NoReturn:
        """Some policy blocks the request: 429, or 503 when only `closed` ones Redis could not decide."""
        blocking = [c for c in checked if c.verdict == "limited"]  # is_limited(c.decision)
        if not blocking:
            raise GatewayError(
                gateway_error(503, "SERVICE_UNAVAILABLE", "Rate limits cannot be checked right now.")
            )
        wait = retry_after([c.limit for c in checked], [c.decision for c in checked])
        raise GatewayError(
            gateway_error(
                429,
                "RATE_LIMIT_EXCEEDED",
                None if wait is not None else _NEVER_PASSES,
                details=[_detail(c) for c in blocking],
                headers={} if wait is None else {"Retry-After": str(wait)},
            )
        )


def _detail(checked: Checked) -> dict[str, Any]:
    detail: dict[str, Any] = {"limited_by": checked.policy.limited_by, "policy": checked.policy.name}
    if cost_exceeds_limit(checked.limit, checked.decision):
        # Why there is no Retry-After: waiting cannot help until the limit (a team override) is raised.
        detail.update(cost_exceeds_limit=True, cost=checked.limit.cost, limit=checked.decision.limit)
    return detail
