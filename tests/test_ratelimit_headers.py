"""gateway/ratelimit/headers.py: which policy speaks in X-RateLimit-*, the exact reset instant, and
Retry-After. Pure: decisions come from a MemoryBackend on a fake clock."""

from __future__ import annotations

import math
from dataclasses import replace

from gateway.ratelimit.algorithms import RETRY_SLACK
from gateway.ratelimit.headers import response_headers, retry_after
from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.types import Decision, Limit

MONTH_END = 1796083200.0  # 2026-12-01T00:00:00Z
MONTH_START = 1793491200.0  # 2026-11-01T00:00:00Z


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def monthly(limit: int, cost: int = 1) -> Limit:
    key = "gw:rl:{c:1}:monthly"
    return Limit("monthly", key, "quota", limit, window_start=MONTH_START, window_end=MONTH_END, cost=cost)


def per_second(burst: int, rate: float = 1.0, cost: int = 1, name: str = "per-second") -> Limit:
    return Limit(name, f"gw:rl:{{c:1}}:{name}", "gcra", burst, rate=rate, cost=cost)


def test_a_rejection_is_described_by_the_blocking_policy_not_an_admitting_one() -> None:
    """Monthly quota 2 plus 1/s burst 1: the second request is blocked by the rate, while the quota still
    admits it (remaining 0 "as if admitted", reset at month end): the client must hear about the rate."""
    clock = FakeClock(MONTH_END - 10 * 86400 + 0.25)
    backend = MemoryBackend(clock=clock)
    limits = [monthly(2), per_second(1)]
    backend.check_sync(limits)
    decisions = backend.check_sync(limits)
    assert [d.allowed for d in decisions] == [True, False]
    headers = response_headers(limits, decisions, clock.now, ietf=False)
    assert headers == {
        "X-RateLimit-Limit": "1",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(math.ceil(clock.now + 1)),
    }
    # consistent with Retry-After: the reset named is no later than the wait
    assert int(headers["X-RateLimit-Reset"]) <= math.ceil(clock.now) + retry_after(limits, decisions)


def test_of_several_blocking_policies_the_one_retry_after_waits_for_speaks() -> None:
    limits = [per_second(1, rate=1.0, name="fast"), per_second(1, rate=0.1, name="slow"), monthly(100)]
    decisions = [
        Decision("fast", False, False, 1, 0, 0.5, 0.5),
        Decision("slow", False, False, 1, 0, 9.0, 9.0),
        Decision("monthly", True, False, 100, 0, 900000.0, 0.0),
    ]
    headers = response_headers(limits, decisions, 1000.0, ietf=False)
    assert headers["X-RateLimit-Reset"] == "1009"
    assert retry_after(limits, decisions) == 9


def test_on_success_the_policy_with_fewest_left_speaks() -> None:
    limits = [monthly(100), per_second(5)]
    decisions = [
        Decision("monthly", True, False, 100, 2, 1000.0, 0.0),
        Decision("per-second", True, False, 5, 4, 0.2, 0.0),
    ]
    headers = response_headers(limits, decisions, MONTH_END - 1000.4, ietf=False)
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("100", "2")


def test_a_quota_resets_exactly_at_its_window_end_whatever_the_clock_read_since() -> None:
    """The filter reads the clock after the check (possibly after a Redis round trip): the quota's reset is
    its window end, not the decision's reset_after added to that later reading and rounded up."""
    clock = FakeClock(MONTH_END - 1000.5)
    limits = [monthly(5)]
    decisions = MemoryBackend(clock=clock).check_sync(limits)
    later = clock.now + 0.3
    assert response_headers(limits, decisions, later, ietf=False)["X-RateLimit-Reset"] == str(int(MONTH_END))


def test_a_gcra_reset_is_never_earlier_than_true() -> None:
    clock = FakeClock(5000.25)
    limits = [per_second(3, rate=2.0)]
    decisions = MemoryBackend(clock=clock).check_sync(limits)
    true_reset = clock.now + decisions[0].reset_after  # the bucket is full again at 5000.75
    reset = int(response_headers(limits, decisions, clock.now + 0.01, ietf=False)["X-RateLimit-Reset"])
    assert true_reset <= reset <= true_reset + 1


def test_a_cost_above_the_effective_limit_has_no_retry_after() -> None:
    """A team override below the route's cost: no wait can admit the request, so no Retry-After is promised,
    and that policy speaks in the headers."""
    backend = MemoryBackend(clock=FakeClock(MONTH_START + 60))
    backend.set_override("gw:rl:{c:1}:override", "per-second:limit", 2)
    limits = [monthly(100, cost=5), replace(per_second(10, cost=5), override_key="gw:rl:{c:1}:override")]
    decisions = backend.check_sync(limits)
    assert decisions[1].limit == 2 and not decisions[1].allowed
    assert decisions[1].retry_after > RETRY_SLACK  # a figure that waiting would never honour
    assert retry_after(limits, decisions) is None
    assert response_headers(limits, decisions, MONTH_START + 60, ietf=False)["X-RateLimit-Limit"] == "2"
