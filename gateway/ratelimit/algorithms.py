"""The limiter math, pure and clock-free: the single source of truth.

MemoryBackend runs it directly; script.lua is a line-by-line port (same operations in the same order, so the
same IEEE doubles come out) and the Redis tests check the script against these functions at fixed times.

Two deliberate tolerances, both far below the 1 µs resolution of Redis TIME:
- retry_after carries RETRY_SLACK on top of the exact figure, so a caller that waits exactly retry_after is
  admitted despite `now + retry_after` rounding (the API promises Retry-After is never too early);
- remaining adds REMAINING_EPS before flooring, so 4 - 1e-16 requests left reads as 4, not 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from gateway.ratelimit.types import Decision, Limit

RETRY_SLACK = 1e-6
REMAINING_EPS = 1e-9
# A quota counter outlives its window by this much, so an instance whose clock lags slightly behind still
# counts into the old window instead of starting it afresh.
QUOTA_GRACE = 10.0


class Verdict(NamedTuple):
    allowed: bool
    remaining: int
    reset_after: float
    retry_after: float


def gcra(
    tat: float | None, now: float, limit: int, rate: float, period: float, cost: int
) -> tuple[Verdict, float | None]:
    """GCRA for one key: (verdict, new TAT to store, or None when rejected and nothing may change).

    `tat` is the stored theoretical arrival time (None when the key is absent, i.e. the bucket is full).
    Everything is computed from the backlog tat - now, a small number, so epoch-sized times lose no
    precision (and tat - now is exact for nearby doubles).
    """
    interval = period / rate
    backlog = 0.0 if tat is None else max(tat - now, 0.0)
    new_backlog = backlog + cost * interval
    burst = limit * interval
    if new_backlog > burst:
        # Rejected: nothing consumed, so the bucket is full again after the current backlog drains.
        return Verdict(False, 0, backlog, new_backlog - burst + RETRY_SLACK), None
    remaining = max(math.floor((burst - new_backlog) / interval + REMAINING_EPS), 0)
    return Verdict(True, remaining, new_backlog, 0.0), now + new_backlog


def quota(
    count: int | None, now: float, limit: int, window_end: float, cost: int
) -> tuple[Verdict, int | None]:
    """A fixed-window count: (verdict, new count to store, or None when rejected)."""
    used = count or 0
    reset_after = max(window_end - now, 0.0)
    if used + cost > limit:
        return Verdict(False, 0, reset_after, reset_after + RETRY_SLACK), None
    return Verdict(True, limit - used - cost, reset_after, 0.0), used + cost


def gcra_expiry(now: float, new_tat: float) -> float:
    """When a GCRA key may vanish: once the bucket is full again, rounded up to Redis's millisecond PX."""
    return now + math.ceil((new_tat - now) * 1000) / 1000


def quota_expiry(now: float, window_end: float) -> float:
    return max(window_end, now) + QUOTA_GRACE


def fixed_window(now: float, length: float, origin: float = 0.0) -> tuple[float, float]:
    """The [start, end) window of `length` seconds containing `now`, aligned to `origin` (e.g. UTC days)."""
    start = origin + math.floor((now - origin) / length) * length
    return start, start + length


def parse_override(field: str, value: str | bytes | float | None) -> float | None:
    """An override value, or None when absent or unusable (then the configured value stands)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if field == "limit":
        return float(math.floor(number)) if number >= 0 else None
    return number if number > 0 else None


@dataclass(frozen=True, slots=True)
class Write:
    """State to store when the request is admitted: a TAT or a count, and when the key may expire."""

    key: str
    value: float
    expires_at: float


Reader = Callable[[str], float | None]
OverrideReader = Callable[[str, str], str | bytes | float | None]


def effective(limit: Limit, overrides: OverrideReader) -> tuple[int, float]:
    """(limit, rate) after the team's overrides, if any."""
    if limit.override_key is None:
        return limit.limit, limit.rate
    new_limit = parse_override("limit", overrides(limit.override_key, f"{limit.policy}:limit"))
    new_rate = parse_override("rate", overrides(limit.override_key, f"{limit.policy}:rate"))
    return (
        limit.limit if new_limit is None else int(new_limit),
        limit.rate if new_rate is None or limit.algorithm != "gcra" else new_rate,
    )


def evaluate(
    limits: Sequence[Limit], now: float, read: Reader, overrides: OverrideReader
) -> tuple[list[Decision], list[Write]]:
    """Every limit of one request, all or nothing: the writes to apply (none if any enforced limit rejects).

    Limits are applied in order against a tentative state, so two limits on the same key see each other.
    A shadow limit that would reject is reported and skipped; it never blocks and never consumes.
    """
    pending: dict[str, float | None] = {}
    decisions: list[Decision] = []
    writes: list[Write] = []
    for lim in limits:
        key = lim.storage_key
        state = pending[key] if key in pending else read(key)
        eff_limit, eff_rate = effective(lim, overrides)
        if lim.algorithm == "gcra":
            verdict, new_state = gcra(state, now, eff_limit, eff_rate, lim.period, lim.cost)
            expires_at = 0.0 if new_state is None else gcra_expiry(now, new_state)
        else:
            count = None if state is None else int(state)
            verdict, new_count = quota(count, now, eff_limit, lim.window_end, lim.cost)
            new_state = None if new_count is None else float(new_count)
            expires_at = quota_expiry(now, lim.window_end)
        decisions.append(Decision(lim.policy, verdict.allowed, lim.shadow, eff_limit, *verdict[1:]))
        if new_state is not None:
            pending[key] = new_state
            writes.append(Write(key, new_state, expires_at))
    if any(d.enforced_reject for d in decisions):
        return decisions, []
    return decisions, writes
