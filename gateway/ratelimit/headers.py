"""What a client is told about its limits: X-RateLimit-*, Retry-After, the IETF RateLimit fields, and the
429's details. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.ratelimit.types import Decision, Limit


def _window(limit: Limit) -> float:
    """Seconds the policy's quota refers to: a full burst's refill time, or the calendar window."""
    if limit.algorithm == "gcra":
        return limit.limit * limit.period / limit.rate
    return limit.window_end - limit.window_start


def response_headers(
    limits: Sequence[Limit], decisions: Sequence[Decision], now: float, *, ietf: bool
) -> dict[str, str]:
    """The most restrictive enforced policy (fewest requests left) speaks for all in X-RateLimit-*."""
    enforced = [(lim, d) for lim, d in zip(limits, decisions, strict=True) if not d.shadow]
    if not enforced:
        return {}
    _, most = min(enforced, key=lambda pair: (pair[1].remaining, -pair[1].reset_after))
    headers = {
        "X-RateLimit-Limit": str(most.limit),
        "X-RateLimit-Remaining": str(most.remaining),
        "X-RateLimit-Reset": str(math.ceil(now + most.reset_after)),
    }
    if ietf:
        headers["RateLimit-Policy"] = ", ".join(
            f'"{d.policy}";q={d.limit};w={math.ceil(_window(lim))}' for lim, d in enforced
        )
        headers["RateLimit"] = ", ".join(
            f'"{d.policy}";r={d.remaining};t={math.ceil(d.reset_after)}' for _, d in enforced
        )
    return headers


def retry_after(decisions: Sequence[Decision]) -> int:
    """Whole seconds, rounded up, until every blocking policy would admit the request (never earlier)."""
    waits = [d.retry_after for d in decisions if d.enforced_reject]
    return max(1, math.ceil(max(waits, default=0.0)))
