"""What a client is told about its limits: X-RateLimit-*, Retry-After, the IETF RateLimit fields, and the
429's details. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.ratelimit.resilient import is_limited
from gateway.ratelimit.types import Decision, Limit


def _window(limit: Limit) -> float:
    """Seconds the policy's quota refers to: a full burst's refill time, or the calendar window."""
    if limit.algorithm == "gcra":
        return limit.limit * limit.period / limit.rate
    return limit.window_end - limit.window_start


def cost_exceeds_limit(limit: Limit, decision: Decision) -> bool:
    """No wait can admit this request: its cost is above the policy's effective limit (a team override
    below the route's cost; the config refuses such values, an override in Redis cannot be refused)."""
    return decision.limit < limit.cost


def _blocking(limits: Sequence[Limit], decisions: Sequence[Decision]) -> list[tuple[Limit, Decision]]:
    """The policies that make this a 429 (not those Redis could not decide: those make it a 503)."""
    return [(lim, d) for lim, d in zip(limits, decisions, strict=True) if is_limited(d)]


def _speaker(
    enforced: list[tuple[Limit, Decision]], blocking: list[tuple[Limit, Decision]]
) -> tuple[Limit, Decision]:
    """On a rejection, the blocking policy Retry-After waits for (an admitting policy's figures are "as if
    admitted" and would tell the client it may go on); otherwise the one with the fewest requests left
    (the first of those that refills last)."""
    if blocking:
        return max(blocking, key=lambda pair: (cost_exceeds_limit(*pair), pair[1].retry_after))
    speaker = enforced[0]
    fewest = speaker[1]
    for pair in enforced:  # min() by (remaining, -reset_after), without a key function per request
        d = pair[1]
        if d.remaining < fewest.remaining or (
            d.remaining == fewest.remaining and d.reset_after > fewest.reset_after
        ):
            speaker, fewest = pair, d
    return speaker


def _reset(limit: Limit, decision: Decision, now: float) -> int:
    """Epoch seconds: a quota resets exactly at its window's end, whatever the clock read since; a GCRA
    bucket's refill is relative to the check, and `now` (read after it) rounds it late, never early."""
    if limit.algorithm == "quota":
        return math.ceil(limit.window_end)
    return math.ceil(now + decision.reset_after)


def response_headers(
    limits: Sequence[Limit], decisions: Sequence[Decision], now: float, *, ietf: bool
) -> dict[str, str]:
    """One enforced policy speaks for all in X-RateLimit-* (see _speaker); `now` is read after the check."""
    return pair_headers(list(zip(limits, decisions, strict=True)), now, ietf=ietf)


def pair_headers(pairs: Sequence[tuple[Limit, Decision]], now: float, *, ietf: bool) -> dict[str, str]:
    """response_headers for (limit, decision) pairs."""
    enforced = [pair for pair in pairs if not pair[1].shadow]
    if not enforced:
        return {}
    # A limited decision is never a shadow one, nor an admitting one: the blocking pairs are among these.
    limit, most = _speaker(
        enforced, [pair for pair in enforced if not pair[1].allowed and is_limited(pair[1])]
    )
    headers = {
        "X-RateLimit-Limit": str(most.limit),
        "X-RateLimit-Remaining": str(most.remaining),
        "X-RateLimit-Reset": str(_reset(limit, most, now)),
    }
    if ietf:
        headers["RateLimit-Policy"] = ", ".join(
            f'"{d.policy}";q={d.limit};w={math.ceil(_window(lim))}' for lim, d in enforced
        )
        headers["RateLimit"] = ", ".join(
            f'"{d.policy}";r={d.remaining};t={math.ceil(d.reset_after)}' for _, d in enforced
        )
    return headers


def retry_after(limits: Sequence[Limit], decisions: Sequence[Decision]) -> int | None:
    """Whole seconds, rounded up, until every blocking policy would admit the request (never earlier); None
    when one never will (cost_exceeds_limit), since any figure would be a promise the gateway breaks."""
    blocking = _blocking(limits, decisions)
    if any(cost_exceeds_limit(lim, d) for lim, d in blocking):
        return None
    return max(1, math.ceil(max((d.retry_after for _, d in blocking), default=0.0)))
