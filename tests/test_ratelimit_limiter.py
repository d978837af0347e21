"""gateway/ratelimit/limiter.py: all or nothing across in-process and Redis policies, and what a refund
gives back. In-process state on a fake clock; Redis real, at one request per hour so its clock is moot."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from gateway.auth.identity import Identity
from gateway.config import PolicyConfig, PolicyValues
from gateway.ratelimit.limiter import RateLimiter
from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.policies import Caller, compile_policies
from gateway.ratelimit.redis_backend import RedisBackend
from gateway.ratelimit.resilient import ResilientBackend

ONE_PER_HOUR = {"rate": 1.0, "period": 3600.0}


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[RateLimiter]:
    policies = compile_policies(
        {
            "ip": PolicyConfig(key=("ip",), scope="local", burst=5, **ONE_PER_HOUR),
            "ip-trial": PolicyConfig(key=("ip",), scope="local", burst=1, shadow=True, **ONE_PER_HOUR),
            "per-route": PolicyConfig(key=("route",), burst=1, **ONE_PER_HOUR),
        }
    )
    clock = FakeClock(1_800_000_000.0)
    client = redis.asyncio.Redis.from_url(redis_url)
    shared = ResilientBackend(RedisBackend(client), MemoryBackend(clock), budget=1.0)
    yield RateLimiter(policies, local=MemoryBackend(clock), shared=shared, clock=clock)
    await shared.close()
    await client.aclose()


async def test_a_shadow_policy_that_consumed_nothing_gets_nothing_back(limiter: RateLimiter) -> None:
    names = ("ip", "ip-trial", "per-route")
    identity = Identity(credential_type="agent")

    async def verdicts(route: str) -> dict[str, bool]:
        outcome = await limiter.check(names, Caller("10.0.0.1", identity, route), 1)
        assert outcome is not None
        return {c.policy.name: c.decision.allowed for c in outcome.checked}

    assert await verdicts("a") == {"ip": True, "ip-trial": True, "per-route": True}
    # per-route rejects: the IP's count is refunded, the shadow one (which would have rejected) was not used
    assert await verdicts("a") == {"ip": True, "ip-trial": False, "per-route": False}
    # so its one request is still spent
    assert (await verdicts("b"))["ip-trial"] is False


async def test_a_refund_gives_back_only_what_has_not_drained_meanwhile() -> None:
    # Burst 2 at 1/s. Request A passes the IP stage, then waits 1.5 s (a slow token check) while A's count
    # drains away and B1, B2 fill the bucket; A's refund must not erase theirs.
    clock = FakeClock(1_800_000_000.0)
    policies = compile_policies(
        {"ip": PolicyConfig(key=("ip",), scope="local", burst=2, rate=1.0, period=1.0)}
    )
    limiter = RateLimiter(policies, local=MemoryBackend(clock), shared=None, clock=clock)
    caller = Caller("10.0.0.1", None, "api")

    async def allowed() -> bool:
        outcome = await limiter.check(["ip"], caller, 1)
        assert outcome is not None
        return outcome.checked[0].decision.allowed

    first = await limiter.check(["ip"], caller, 1)
    assert first is not None
    clock.now += 1.5
    assert [await allowed(), await allowed()] == [True, True]  # B1, B2: the bucket is full again
    limiter.refund(first)
    assert not await allowed()

    # Refunded at once, a grant comes back whole: exactly one more request fits.
    clock.now += 10.0
    assert [await allowed(), await allowed()] == [True, True]
    second = await limiter.check(["ip"], caller, 1)
    assert second is not None and not second.checked[0].decision.allowed
    clock.now += 1.0  # one request's worth drained
    third = await limiter.check(["ip"], caller, 1)
    assert third is not None and third.checked[0].decision.allowed
    limiter.refund(third)
    assert await allowed() and not await allowed()


async def test_a_refunded_bucket_leaves_the_table_when_it_is_full_again() -> None:
    clock = FakeClock(1_800_000_000.0)
    policies = compile_policies(
        {"ip": PolicyConfig(key=("ip",), scope="local", burst=5, rate=1.0, period=1.0)}
    )
    table = MemoryBackend(clock)
    limiter = RateLimiter(policies, local=table, shared=None, clock=clock)
    only = await limiter.check(["ip"], Caller("10.0.0.1", None, "api"), 1)
    assert only is not None and len(table) == 1
    limiter.refund(only)  # all it held: the bucket is full again, nothing to keep
    assert len(table) == 0
    # Two grants, one given back: the key now expires 1 s after the check, not 2 s.
    await limiter.check(["ip"], Caller("10.0.0.2", None, "api"), 1)
    second = await limiter.check(["ip"], Caller("10.0.0.2", None, "api"), 1)
    assert second is not None
    limiter.refund(second)
    clock.now += 2.0  # the expiry (+1) plus the one-second sweep granularity
    table.expire()
    assert len(table) == 0


def test_limits_are_resolved_per_caller_cost_plan_and_credential_type() -> None:
    """limit_for hands out the same Limit again for the same inputs: interleaved callers still each get
    their own key and values, however the requests alternate."""
    policies = compile_policies(
        {
            "customer": PolicyConfig(
                key=("customer",),
                rate=1.0,
                burst=10,
                plans={"pro": PolicyValues(burst=50)},
                by_credential_type={"direct": PolicyValues(rate=5.0)},
            ),
            "route+ip": PolicyConfig(key=("route", "ip"), burst=3, rate=1.0),
        }
    )
    customer, per_route = policies["customer"], policies["route+ip"]

    def resolved(caller: Caller, cost: int) -> tuple[str, int, float, int]:
        limit = customer.limit_for(caller, 0.0, cost)
        assert limit is not None
        return limit.key, limit.limit, limit.rate, limit.cost

    free = Caller("10.0.0.1", Identity(credential_type="agent", customer_id="a"), "r")
    pro = Caller("10.0.0.1", Identity(credential_type="agent", customer_id="a", plan="pro"), "r")
    direct = Caller("10.0.0.1", Identity(credential_type="direct", customer_id="a", plan="pro"), "r")
    other = Caller("10.0.0.1", Identity(credential_type="agent", customer_id="b"), "r")
    expected = [
        (free, 1, ("gw:rl:{c:a}:customer", 10, 1.0, 1)),
        (pro, 1, ("gw:rl:{c:a}:customer", 50, 1.0, 1)),
        (direct, 1, ("gw:rl:{c:a}:customer:type=direct", 50, 5.0, 1)),
        (other, 1, ("gw:rl:{c:b}:customer", 10, 1.0, 1)),
        (free, 3, ("gw:rl:{c:a}:customer", 10, 1.0, 3)),
    ]
    for _ in range(2):
        for caller, cost, want in expected:
            assert resolved(caller, cost) == want
    assert customer.limit_for(Caller("10.0.0.1", None, "r"), 0.0, 1) is None  # anonymous: does not apply
    keys = [
        lim.key if (lim := per_route.limit_for(Caller(ip, None, route), 0.0, 1)) else None
        for ip, route in [("10.0.0.1", "a"), ("10.0.0.2", "a"), ("10.0.0.1", "b"), ("10.0.0.1", "a")]
    ]
    assert keys == [
        "gw:rl:{ip:10.0.0.1}:route+ip:route=a",
        "gw:rl:{ip:10.0.0.2}:route+ip:route=a",
        "gw:rl:{ip:10.0.0.1}:route+ip:route=b",
        "gw:rl:{ip:10.0.0.1}:route+ip:route=a",
    ]
