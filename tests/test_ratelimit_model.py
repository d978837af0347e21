"""The limiter math and MemoryBackend against an independent reference model, on a fake clock.

The reference is written differently on purpose: GCRA as a continuous leaky bucket (a level that drains
at one second per second) in exact rational arithmetic, quotas as a plain dict of per-window counts. Where
the exact answer sits on a boundary (within TOL seconds), either decision is right and the model follows the
implementation, so float rounding never makes a test flaky while any real disagreement still fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ratelimit import Decision, Limit, MemoryBackend
from gateway.ratelimit.algorithms import QUOTA_GRACE, evaluate, fixed_window, gcra, quota

TOL = 1e-5  # seconds: far above float error at epoch scale (~1e-7), far below any generated time step
EPOCH = 1_700_000_000.0
# Rates with rational emission intervals, so exact boundaries (margin 0) happen and get exercised.
RATES = st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.0, 10.0, 50.0])
PERIODS = st.sampled_from([1.0, 60.0])


class FakeClock:
    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class LeakyBucket:
    """GCRA's twin: `level` seconds of work queued at `last`, draining in real time, capacity limit*T."""

    limit: int
    interval: Fraction
    level: Fraction = Fraction(0)
    last: Fraction = Fraction(0)

    def margin(self, now: Fraction, cost: int) -> tuple[Fraction, Fraction]:
        """(how far the request would overflow the bucket, in seconds: > 0 rejects; level before it)."""
        level = max(self.level - (now - self.last), Fraction(0))
        return level + cost * self.interval - self.limit * self.interval, level

    def admit(self, now: Fraction, cost: int) -> None:
        self.level = max(self.level - (now - self.last), Fraction(0)) + cost * self.interval
        self.last = now


def exact(x: float) -> Fraction:
    return Fraction(x)


def check_gcra_verdict(bucket: LeakyBucket, now: float, cost: int, decision: Decision) -> bool:
    """Asserts the decision is what the leaky bucket says (either way on a boundary); returns `allowed`."""
    margin, level = bucket.margin(exact(now), cost)
    if abs(margin) > TOL:
        assert decision.allowed == (margin <= 0), (margin, decision)
    interval = float(bucket.interval)
    if decision.allowed:
        left = float(-margin) / interval
        assert max(math.floor(left - TOL), 0) <= decision.remaining <= math.floor(left + TOL)
        assert decision.retry_after == 0.0
        assert decision.reset_after == pytest.approx(float(level) + cost * interval, abs=TOL)
    else:
        assert decision.remaining == 0
        # Never earlier than the exact moment, and only by float slack later.
        assert float(margin) - TOL <= decision.retry_after <= float(margin) + TOL
        assert decision.reset_after == pytest.approx(float(level), abs=TOL)
    return decision.allowed


# --- the pure functions ----------------------------------------------------------------------------------


@given(
    limit=st.integers(1, 20),
    rate=RATES,
    period=PERIODS,
    steps=st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 3)), min_size=1, max_size=60),
)
@settings(max_examples=300, deadline=None)
def test_gcra_matches_leaky_bucket_and_never_over_admits(
    limit: int, rate: float, period: float, steps: list[tuple[int, int]]
) -> None:
    interval = Fraction(period) / Fraction(rate)
    bucket = LeakyBucket(limit, interval)
    tat: float | None = None
    now = EPOCH
    admitted: list[tuple[float, int]] = []
    for step_ms, cost in steps:
        now += step_ms / 1000
        verdict, new_tat = gcra(tat, now, limit, rate, period, cost)
        decision = Decision("p", verdict.allowed, False, limit, *verdict[1:])
        if check_gcra_verdict(bucket, now, cost, decision):
            assert new_tat is not None
            bucket.admit(exact(now), cost)
            tat = new_tat
            admitted.append((now, cost))
        else:
            assert new_tat is None
    # Over any interval [t_i, t_j]: admitted cost <= burst + rate * elapsed (GCRA's defining bound).
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, cost in admitted[i:]:
            total += cost
            assert total <= limit + (end - start + TOL) * rate / period


@given(
    limit=st.integers(1, 20),
    rate=RATES,
    period=PERIODS,
    backlog=st.floats(0, 1000),
    cost=st.integers(1, 20),
)
@settings(max_examples=300, deadline=None)
def test_gcra_retry_after_is_exact(limit: int, rate: float, period: float, backlog: float, cost: int) -> None:
    now = EPOCH
    tat = now + backlog
    verdict, _ = gcra(tat, now, limit, rate, period, cost)
    if verdict.allowed or cost > limit:
        return
    later = now + verdict.retry_after
    assert gcra(tat, later, limit, rate, period, cost)[0].allowed
    if verdict.retry_after > TOL:
        assert not gcra(tat, later - TOL, limit, rate, period, cost)[0].allowed


@given(limit=st.integers(0, 20), rate=RATES, cost=st.integers(1, 40), count=st.integers(0, 40))
def test_cost_above_limit_is_always_rejected(limit: int, rate: float, cost: int, count: int) -> None:
    if cost <= limit:
        return
    assert not gcra(None, EPOCH, limit, rate, 1.0, cost)[0].allowed
    assert not quota(0, EPOCH, limit, EPOCH + 60, cost)[0].allowed
    assert gcra(None, EPOCH, limit, rate, 1.0, cost)[0].retry_after > 0


@given(limit=st.integers(0, 30), steps=st.lists(st.integers(1, 5), max_size=40))
def test_quota_counts_exactly(limit: int, steps: list[int]) -> None:
    count = 0
    for cost in steps:
        verdict, new = quota(count, EPOCH, limit, EPOCH + 90, cost)
        assert verdict.allowed == (count + cost <= limit)
        assert verdict.reset_after == 90.0
        if verdict.allowed:
            assert new == count + cost and verdict.remaining == limit - new and verdict.retry_after == 0
            count = new
        else:
            assert new is None and verdict.remaining == 0 and verdict.retry_after >= 90.0
    assert count <= limit


# --- MemoryBackend against the model ---------------------------------------------------------------------


@dataclass
class Model:
    """The reference: leaky buckets and per-window counts, all or nothing, shadow never blocks."""

    limits: list[Limit]
    buckets: dict[str, LeakyBucket] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    admitted: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def verify(self, now: float, used: list[Limit], decisions: list[Decision]) -> None:
        assert [d.policy for d in decisions] == [lim.policy for lim in used]
        for lim, decision in zip(used, decisions, strict=True):
            assert decision.shadow == lim.shadow and decision.limit == lim.limit
            if lim.algorithm == "gcra":
                bucket = self.buckets.setdefault(
                    lim.key, LeakyBucket(lim.limit, Fraction(lim.period) / Fraction(lim.rate))
                )
                check_gcra_verdict(bucket, now, lim.cost, decision)
            else:
                window = f"{lim.key}@{lim.window_start}"
                count = self.counts.get(window, 0)
                assert decision.allowed == (count + lim.cost <= lim.limit)
                assert decision.remaining == (lim.limit - count - lim.cost if decision.allowed else 0)
                assert decision.reset_after == pytest.approx(lim.window_end - now)
        if any(not d.allowed and not d.shadow for d in decisions):
            return  # all or nothing: the model consumes nothing either
        for lim, decision in zip(used, decisions, strict=True):
            if not decision.allowed:
                continue  # a shadow limit that would reject consumes nothing
            self.admitted.setdefault(lim.policy, []).append((now, lim.cost))
            if lim.algorithm == "gcra":
                self.buckets[lim.key].admit(exact(now), lim.cost)
            else:
                window = f"{lim.key}@{lim.window_start}"
                self.counts[window] = self.counts.get(window, 0) + lim.cost


def gcra_limits() -> st.SearchStrategy[Limit]:
    return st.builds(
        lambda i, limit, rate, period, shadow: Limit(
            f"g{i}", f"gw:rl:{{t}}:g{i}", "gcra", limit, rate=rate, period=period, shadow=shadow
        ),
        st.integers(0, 10**6),
        st.integers(0, 8),
        RATES,
        PERIODS,
        st.booleans(),
    )


@given(
    limits=st.lists(gcra_limits(), min_size=1, max_size=4, unique_by=lambda lim: lim.key),
    quota_limit=st.one_of(st.none(), st.integers(0, 15)),
    steps=st.lists(
        st.tuples(st.integers(0, 2500), st.integers(1, 3), st.integers(1, 31)), min_size=1, max_size=60
    ),
)
@settings(max_examples=200, deadline=None)
async def test_memory_backend_matches_model(
    limits: list[Limit], quota_limit: int | None, steps: list[tuple[int, int, int]]
) -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    model = Model(limits)
    for step_ms, cost, mask in steps:
        clock.now += step_ms / 1000
        used = [
            Limit(lim.policy, lim.key, "gcra", lim.limit, lim.rate, lim.period, cost=cost, shadow=lim.shadow)
            for i, lim in enumerate(limits)
            if mask >> i & 1
        ] or [limits[0]]
        if quota_limit is not None:
            start, end = fixed_window(clock.now, 10.0)
            used.append(Limit("q", "gw:rl:{t}:q", "quota", quota_limit, window_start=start, window_end=end))
        model.verify(clock.now, used, await backend.check(used))
    # No limit ever admitted more than burst + rate * elapsed, over any interval.
    for lim in limits:
        log = model.admitted.get(lim.policy, [])
        for i, (start, _) in enumerate(log):
            total = 0
            for end, cost in log[i:]:
                total += cost
                assert total <= lim.limit + (end - start + TOL) * lim.rate / lim.period


@given(
    enforced=st.integers(1, 5),
    shadow_limit=st.integers(0, 3),
    n=st.integers(1, 12),
)
async def test_shadow_never_blocks(enforced: int, shadow_limit: int, n: int) -> None:
    backend = MemoryBackend(clock=FakeClock())
    real = Limit("real", "gw:rl:{c}:real", "gcra", enforced, rate=1 / 3600)
    shadow = Limit("dry", "gw:rl:{c}:dry", "gcra", shadow_limit, rate=1 / 3600, shadow=True)
    results = [await backend.check([shadow, real]) for _ in range(n)]
    # The enforced limit alone decides; the shadow one counts only requests that actually went through.
    assert [r[1].allowed for r in results] == [i < enforced for i in range(n)]
    went_through = min(n, enforced)
    assert [r[0].allowed for r in results][:went_through] == [i < shadow_limit for i in range(went_through)]
    assert all(r[0].shadow and not r[1].shadow for r in results)


@given(
    a=st.integers(0, 6),
    b=st.integers(0, 6),
    shadow_b=st.booleans(),
    n=st.integers(1, 15),
)
async def test_all_or_nothing(a: int, b: int, shadow_b: bool, n: int) -> None:
    backend = MemoryBackend(clock=FakeClock())
    la = Limit("a", "gw:rl:{c}:a", "gcra", a, rate=1 / 3600)
    lb = Limit("b", "gw:rl:{c}:b", "quota", b, window_end=EPOCH + 3600, shadow=shadow_b)
    admitted = 0
    for _ in range(n):
        admitted += all(d.allowed or d.shadow for d in await backend.check([la, lb]))
    assert admitted == min(n, a if shadow_b else min(a, b))
    # Each limit consumed exactly what was admitted (a shadow one: what it admitted of those), nothing more.
    left_a = (await backend.check([la]))[0]
    assert left_a.allowed == (admitted < a)
    consumed_b = min(admitted, b) if shadow_b else admitted
    left_b = (await backend.check([lb]))[0]
    assert left_b.allowed == (consumed_b < b)


@given(limit=st.integers(1, 5), rate=RATES, cost=st.integers(1, 5), wait_ms=st.integers(0, 4000))
async def test_memory_retry_after_is_exact(limit: int, rate: float, cost: int, wait_ms: int) -> None:
    if cost > limit:
        return
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    lim = Limit("p", "gw:rl:{c}:p", "gcra", limit, rate=rate, cost=cost)
    for _ in range(limit + 1):  # drain the burst, then let it partly refill
        await backend.check([lim])
    clock.now += wait_ms / 1000
    rejected = (await backend.check([lim]))[0]
    if rejected.allowed:
        return
    start = clock.now
    if rejected.retry_after > TOL:
        clock.now = start + rejected.retry_after - TOL
        assert not (await backend.check([lim]))[0].allowed
    clock.now = start + rejected.retry_after
    assert (await backend.check([lim]))[0].allowed


@pytest.mark.parametrize("length", [1.0, 60.0, 86400.0])
async def test_quota_resets_exactly_at_window_end(length: float) -> None:
    clock = FakeClock(EPOCH + 0.25)
    backend = MemoryBackend(clock=clock)

    def limit() -> Limit:
        start, end = fixed_window(clock.now, length)
        return Limit("day", "gw:rl:{c}:day", "quota", 3, window_start=start, window_end=end)

    first = limit()
    assert [(await backend.check([first]))[0].remaining for _ in range(3)] == [2, 1, 0]
    clock.now = first.window_end - TOL
    rejected = (await backend.check([limit()]))[0]
    assert not rejected.allowed
    assert rejected.retry_after == pytest.approx(TOL, abs=2e-6)
    clock.now = first.window_end
    fresh = (await backend.check([limit()]))[0]
    assert fresh.allowed and fresh.remaining == 2 and fresh.reset_after == length


async def test_memory_is_bounded_and_forgets_the_least_recently_used() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, max_keys=50)
    for i in range(200):
        await backend.check([Limit("p", f"k{i}", "gcra", 1, rate=1.0, period=3600)])
    assert len(backend) == 50 and backend.evictions == 150
    # The most recently used keys survive, so their clients stay limited; a forgotten one starts full.
    assert not (await backend.check([Limit("p", "k199", "gcra", 1, rate=1.0, period=3600)]))[0].allowed
    assert (await backend.check([Limit("p", "k0", "gcra", 1, rate=1.0, period=3600)]))[0].allowed
    assert backend.evictions == 151
    # A check that only reads (k160 is rejected, nothing written) makes its key recent too: ten new keys
    # then evict k151-k159 and k161, the least recently used, and not k160.
    assert not (await backend.check([Limit("p", "k160", "gcra", 1, rate=1.0, period=3600)]))[0].allowed
    for i in range(10):
        await backend.check([Limit("p", f"new{i}", "gcra", 1, rate=1.0, period=3600)])
    assert not (await backend.check([Limit("p", "k160", "gcra", 1, rate=1.0, period=3600)]))[0].allowed
    assert (await backend.check([Limit("p", "k161", "gcra", 1, rate=1.0, period=3600)]))[0].allowed


async def test_a_bucket_leaves_the_table_within_a_second_of_being_full_again() -> None:
    clock = FakeClock(EPOCH + 0.3)
    backend = MemoryBackend(clock=clock)
    lim = Limit("p", "k", "gcra", 2, rate=1.0)  # one request fills 1 s of backlog: full again at +1
    await backend.check([lim])
    clock.now += 0.999
    backend.expire()
    assert len(backend) == 1
    clock.now += 0.001
    assert (await backend.check([Limit("p", "other", "gcra", 2, rate=1.0)]))[0].remaining == 1
    clock.now += 1.0
    backend.expire()
    assert len(backend) == 1  # only `other`: no periodic sweep a minute away to wait for


async def test_a_bucket_used_again_stays_until_its_new_expiry() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    lim = Limit("p", "k", "gcra", 3, rate=1.0)
    await backend.check([lim])  # backlog 1 s: would expire at +1
    clock.now += 0.5
    await backend.check([lim])  # backlog 0.5 + 1 = 1.5 s: expires at +2
    clock.now += 0.5
    backend.expire()
    assert len(backend) == 1
    # Its 1 s of backlog still counts (a forgotten bucket would leave 2): backlog 2 s, expiring at +3.
    assert (await backend.check([lim]))[0].remaining == 1
    clock.now += 1.999
    backend.expire()
    assert len(backend) == 1
    clock.now += 1.001
    backend.expire()
    assert len(backend) == 0


async def test_a_quota_count_leaves_after_its_window_and_grace() -> None:
    clock = FakeClock(EPOCH + 10)
    backend = MemoryBackend(clock=clock)
    await backend.check([Limit("q", "q", "quota", 5, window_start=EPOCH, window_end=EPOCH + 60)])
    clock.now = EPOCH + 60 + QUOTA_GRACE - 0.001
    backend.expire()
    assert len(backend) == 1
    clock.now = EPOCH + 60 + QUOTA_GRACE + 1
    await backend.check([])
    assert len(backend) == 0


async def test_evicted_and_expired_keys_leave_the_expiry_index() -> None:
    # Quota counts live for a whole window: an index that kept evicted ones would grow for a month.
    clock = FakeClock(EPOCH + 1)
    backend = MemoryBackend(clock=clock, max_keys=10)
    month = EPOCH + 30 * 86400
    for i in range(20_000):
        backend.check_sync([Limit("q", f"q{i}", "quota", 5, window_start=EPOCH, window_end=month)])
        backend.check_sync([Limit("p", f"p{i}", "gcra", 5, rate=1.0)])
        clock.now += 0.01
    assert len(backend) == 10 and backend.evictions == 39_990
    assert sum(len(keys) for keys in backend._slots.values()) == 10  # each live key once, nothing else
    assert len(backend._slot_order) <= 2 * len(backend._slots) + 1000
    clock.now = month + QUOTA_GRACE + 1
    backend.expire()
    assert len(backend) == 0 and backend._slots == {}


async def test_a_backlog_reaching_far_ahead_keeps_one_slot_per_key() -> None:
    # One request a day with a burst of 100: each request pushes the bucket's expiry a day further.
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, max_keys=16)
    for i in range(500):
        backend.check_sync([Limit("p", f"k{i % 20}", "gcra", 100, rate=1.0, period=86400)])
        clock.now += 0.5
    assert len(backend) == 16 and len(backend._slots) <= 16  # not one per second of backlog passed through
    assert len(backend._slot_order) <= 2 * 16 + 1000


async def test_a_mass_expiry_is_spread_over_calls_and_reads_as_expired_meanwhile() -> None:
    clock = FakeClock(EPOCH + 1)
    backend = MemoryBackend(clock=clock)
    day = EPOCH + 86400
    counts = [Limit("q", f"q{i}", "quota", 5, window_start=EPOCH, window_end=day) for i in range(2500)]
    for lim in counts:
        backend.check_sync([lim])
    clock.now = day + QUOTA_GRACE + 1
    backend.expire()
    assert len(backend) == 1500  # one call drops a batch, not all 2500 in one pause
    assert backend.check_sync([counts[-1]])[0].remaining == 4  # an expired count is gone when read
    backend.expire()
    assert len(backend) == 1  # the rest are swept; only the count just written again stays


# One step: (key index, algorithm, milliseconds to advance, which earlier grant to give back, if any).
STEPS = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from(["gcra", "quota"]),
        st.sampled_from([0, 0, 1, 50, 100, 333, 1000, 1500]),
        st.one_of(st.none(), st.integers(0, 3)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps=STEPS, rate=RATES, burst=st.integers(1, 4))
def test_expiry_never_changes_a_decision(
    steps: list[tuple[int, str, int, int | None]], rate: float, burst: int
) -> None:
    """The table drops entries as they expire (and sweeps, and refunds, now or later): a store that
    forgets nothing must decide every request the same, so nothing is ever dropped while it still counts.
    And every entry is in exactly the slot of its expiry, with no empty slot left behind."""
    clock = FakeClock(EPOCH + 0.25)
    table = MemoryBackend(clock=clock, max_keys=1000)
    kept: dict[str, float] = {}  # never expires
    grants: list[tuple[Limit, Decision, float]] = []

    for index, algorithm, advance_ms, give_back in steps:
        clock.now += advance_ms / 1000
        if algorithm == "gcra":
            lim = Limit("p", f"g{index}", "gcra", burst, rate=rate)
        else:
            start, end = fixed_window(clock.now, 2.0)
            lim = Limit("q", f"q{index}", "quota", burst, window_start=start, window_end=end)
        expected, writes = evaluate([lim], clock.now, kept.get, lambda _key, _field: None)
        kept.update((w.key, w.value) for w in writes)
        assert table.check_sync([lim]) == expected
        if expected[0].allowed:
            grants.append((lim, expected[0], clock.now))
        if give_back is not None and give_back < len(grants):
            granted, decision, checked_at = grants.pop(-1 - give_back)
            table.refund([(granted, decision)], checked_at)
            key = granted.storage_key
            if granted.algorithm == "gcra":  # the part of the grant not drained yet goes back
                ended = checked_at + decision.reset_after
                kept[key] -= min(granted.period / rate, max(ended - clock.now, 0.0))
            else:
                kept[key] = max(0.0, kept[key] - 1)
        if index == 0:
            table.expire()
        assert all(table._slots.values()), "an empty slot was left behind"
        slotted = {key: second for second, keys in table._slots.items() for key in keys}
        assert slotted == {key: math.floor(expires) for key, (_, expires) in table._entries.items()}


async def test_memory_overrides() -> None:
    backend = MemoryBackend(clock=FakeClock())
    lim = Limit("customer", "gw:rl:{c:1}:customer", "gcra", 10, rate=1.0, override_key="gw:ov:{c:1}")
    backend.set_override("gw:ov:{c:1}", "customer:limit", 2)
    backend.set_override("gw:ov:{c:1}", "customer:rate", "0.5")
    backend.set_override("gw:ov:{c:1}", "other:limit", 0)  # another policy's field: ignored here
    decisions = [(await backend.check([lim]))[0] for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[0].limit == 2 and decisions[0].remaining == 1
    assert decisions[2].retry_after == pytest.approx(2.0)  # T = 1 / 0.5 s
    backend.set_override("gw:ov:{c:1}", "customer:limit", "junk")  # unusable: the configured 10 stands
    backend.set_override("gw:ov:{c:1}", "customer:rate", None)
    assert (await backend.check([lim]))[0].limit == 10


def test_limit_validation() -> None:
    with pytest.raises(ValueError):
        Limit("p", "k", "gcra", 5, rate=0.0)
    with pytest.raises(ValueError):
        Limit("p", "k", "quota", 5, window_start=10, window_end=10)
    with pytest.raises(ValueError):
        Limit("p", "k", "gcra", 5, rate=1.0, cost=0)
    assert Limit("p", "gw:{x}:q", "quota", 5, window_start=1.5, window_end=2).storage_key == "gw:{x}:q:1500"
