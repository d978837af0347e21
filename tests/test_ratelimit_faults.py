"""ResilientBackend under Redis faults: the breaker and the limit division on a fake clock, then real
redis-server processes paused (SIGSTOP), killed mid-load and restarted empty on the same port.

Every Redis here is a real process on loopback, either dead (a free port) or one a test starts and abuses.
Rates are one request per hour, so counts are exact however long a test takes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
import redis.asyncio
import uvloop
from redis_server import RedisProcess, free_port
from structlog.testing import capture_logs

from gateway.ratelimit import Decision, Limit, MemoryBackend, RedisBackend
from gateway.ratelimit.algorithms import fixed_window
from gateway.ratelimit.resilient import (
    CircuitBreaker,
    LogSampler,
    ResilientBackend,
    Unavailable,
    is_unavailable,
    local_share,
)
from gateway.redis_client import connect

HOUR = 3600.0
SLOW = 1 / HOUR
# Well above a healthy loopback round trip even on a loaded CI box (at 50 ms, a check timed out there
# before Redis was killed); paused-Redis tests pay it only a handful of times.
BUDGET = 0.2
# A check may take the budget and a busy machine's event-loop jitter (a clean-clone run on a loaded box saw
# 0.504 s), never Redis's 1 s socket timeout: what is in between still tells the two apart.
SLACK = BUDGET + 0.6
RECOVERY = 5.0  # bound on any wait for the backend to find Redis again


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def gcra(policy: str, limit: int, *, tag: str = "c:42", **kw: Any) -> Limit:
    return Limit(policy, f"gw:rl:{{{tag}}}:{policy}", "gcra", limit, rate=kw.pop("rate", SLOW), **kw)


def quota(policy: str, limit: int, *, tag: str = "c:42", **kw: Any) -> Limit:
    start, end = fixed_window(time.time(), HOUR)
    return Limit(
        policy, f"gw:rl:{{{tag}}}:{policy}", "quota", limit, window_start=start, window_end=end, **kw
    )


class CountingBackend:
    """The real RedisBackend, counting the checks that reach it (an open breaker must make none)."""

    enforces_budget = True  # as RedisBackend: the budget is passed on, measured from write to read

    def __init__(self, inner: RedisBackend) -> None:
        self.inner = inner
        self.calls = 0

    async def check(self, limits: Sequence[Limit], *, budget: float | None = None) -> list[Decision]:
        self.calls += 1
        return await self.inner.check(limits, budget=budget)

    async def close(self) -> None:
        await self.inner.close()


class Rig:
    """A ResilientBackend over a real Redis client (gateway.redis_client.connect: 1 s socket timeouts)."""

    def __init__(self, url: str, **kw: Any) -> None:
        self.client = connect(url)
        self.redis = RedisBackend(self.client)
        self.shared = CountingBackend(self.redis)
        self.local = MemoryBackend()
        self.fallbacks: list[tuple[str, str]] = []
        kw.setdefault("budget", BUDGET)
        self.backend = ResilientBackend(
            self.shared,
            self.local,
            on_fallback=lambda p, m: self.fallbacks.append((p, m)),
            **kw,
        )

    async def timed(self, limits: list[Limit], modes: list[Any]) -> tuple[list[Decision], bool, float]:
        start = time.monotonic()
        decisions, fell_back = await self.backend.check(limits, modes)
        return decisions, fell_back, time.monotonic() - start

    async def one(self, limit: Limit, mode: str) -> tuple[Decision, bool]:
        decisions, fell_back, elapsed = await self.timed([limit], [mode])
        assert elapsed < SLACK, f"{mode} check took {elapsed:.3f}s"
        return decisions[0], fell_back

    async def until_redis_decides(self, probe: Limit) -> None:
        """Bounded poll: checks (each within the budget) until one is decided by Redis again."""
        deadline = time.monotonic() + RECOVERY
        while time.monotonic() < deadline:
            _, fell_back = await self.one(probe, "closed")
            if not fell_back:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"still falling back {RECOVERY}s after Redis came back")

    async def close(self) -> None:
        await self.backend.close()
        await self.client.aclose()


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, to pause, kill and restart."""
    proc = RedisProcess().start()
    yield proc
    proc.stop()


@pytest.fixture
async def rigs() -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(url: str, **kw: Any) -> Rig:
        made.append(Rig(url, **kw))
        return made[-1]

    yield make
    for rig in made:
        await rig.close()


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: connection refused


# --- the breaker, on a fake clock ----------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_after=5.0, clock=FakeClock())
    for _ in range(2):
        breaker.failed(breaker.begin())  # type: ignore[arg-type]
    breaker.succeeded(breaker.begin())  # type: ignore[arg-type]  # resets the streak
    for _ in range(2):
        breaker.failed(breaker.begin())  # type: ignore[arg-type]
    assert breaker.state == "closed" and breaker.begin() is not None
    breaker.failed(breaker.begin())  # type: ignore[arg-type]
    assert breaker.state == "open"
    assert breaker.begin() is None


def test_breaker_stays_open_then_admits_one_trial_at_a_time() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after=5.0, clock=clock)
    breaker.failed(breaker.begin())  # type: ignore[arg-type]
    clock.now += 4.999
    assert breaker.begin() is None
    clock.now += 0.001
    trial = breaker.begin()
    assert trial is not None and trial.trial and breaker.state == "half_open"
    assert [breaker.begin() for _ in range(5)] == [None] * 5  # one trial in flight; the rest fall back
    clock.now += 100
    assert breaker.begin() is None  # still only the one, however long it takes
    breaker.succeeded(trial)
    assert breaker.state == "closed" and breaker.closed
    permits = [breaker.begin() for _ in range(3)]
    assert all(p is not None and not p.trial for p in permits)


def test_a_failed_trial_reopens_for_a_full_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after=5.0, clock=clock)
    for _ in range(2):
        breaker.failed(breaker.begin())  # type: ignore[arg-type]
    clock.now += 5.0
    trial = breaker.begin()
    assert trial is not None and trial.trial
    clock.now += 1.0
    breaker.failed(trial)  # one failed trial is enough, whatever the threshold
    assert breaker.state == "open"
    clock.now += 4.999  # measured from the failed trial, not from the first opening
    assert breaker.begin() is None
    clock.now += 0.001
    assert breaker.begin() is not None and breaker.state == "half_open"


def test_stale_outcomes_do_not_move_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after=5.0, clock=clock)
    slow, slower, slowest = breaker.begin(), breaker.begin(), breaker.begin()  # started while closed...
    for _ in range(2):
        breaker.failed(breaker.begin())  # type: ignore[arg-type]
    breaker.succeeded(slow)  # type: ignore[arg-type]  # ...and end after it opened: no evidence now
    assert breaker.state == "open"
    clock.now += 5.0
    trial = breaker.begin()
    breaker.failed(slow)  # type: ignore[arg-type]
    breaker.failed(slowest)  # type: ignore[arg-type]
    assert breaker.state == "half_open"
    breaker.succeeded(trial)  # type: ignore[arg-type]
    assert breaker.state == "closed"
    breaker.failed(breaker.begin())  # type: ignore[arg-type]
    breaker.succeeded(slower)  # type: ignore[arg-type]  # from the previous outage: the streak stands
    breaker.failed(breaker.begin())  # type: ignore[arg-type]
    assert breaker.state == "open"


def test_an_abandoned_trial_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after=1.0, clock=clock)
    breaker.failed(breaker.begin())  # type: ignore[arg-type]
    clock.now += 1.0
    trial = breaker.begin()
    assert trial is not None and breaker.begin() is None
    breaker.abandoned(trial)
    assert breaker.state == "half_open"
    assert breaker.begin() is not None


def test_breaker_logs_each_change_once() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after=1.0, clock=clock)
    with capture_logs() as logs:
        for _ in range(10):
            permit = breaker.begin()
            if permit is not None:
                breaker.failed(permit, "TimeoutError")
        for _ in range(3):  # failed trials: the outage goes on, no new "open"
            clock.now += 1.0
            breaker.failed(breaker.begin(), "ConnectionError")  # type: ignore[arg-type]
        clock.now += 1.0
        breaker.succeeded(breaker.begin())  # type: ignore[arg-type]
        for _ in range(10):
            breaker.succeeded(breaker.begin())  # type: ignore[arg-type]
    events = [e for e in logs if e["event"].startswith("redis_breaker_") and e["log_level"] != "debug"]
    assert [e["event"] for e in events] == ["redis_breaker_open", "redis_breaker_closed"]
    assert events[0]["error"] == "TimeoutError" and events[0]["failures"] == 2
    assert events[1]["down_for"] == 4.0 and events[1]["failed_trials"] == 3


@pytest.mark.parametrize(
    ("burst", "instances", "share"),
    [(10, 1, 10), (10, 2, 5), (10, 3, 4), (1, 4, 1), (3, 10, 1), (0, 3, 0), (1000, 7, 143)],
)
def test_local_share_divides_the_limit(burst: int, instances: int, share: int) -> None:
    lim = gcra("customer", burst, rate=6.0, period=60.0, override_key="gw:ov:{c:42}")
    mine = local_share(lim, instances)
    assert mine.limit == share
    assert mine.rate == pytest.approx(6.0 / instances)
    assert (mine.key, mine.storage_key, mine.period, mine.override_key, mine.policy) == (
        lim.key, lim.storage_key, 60.0, lim.override_key, "customer",
    )  # fmt: skip


def test_local_share_of_quotas_and_costly_requests() -> None:
    daily = quota("daily", 1001)
    mine = local_share(daily, 2)
    assert (mine.limit, mine.storage_key, mine.window_end) == (501, daily.storage_key, daily.window_end)
    # A request the shared limit could admit stays admissible locally.
    assert local_share(gcra("bulk", 10, cost=4), 5).limit == 4
    assert local_share(gcra("bulk", 3, cost=4), 5).limit == 1  # never admissible anyway
    with pytest.raises(ValueError):
        local_share(daily, 0)


def test_log_sampler_one_line_per_key_per_interval() -> None:
    clock = FakeClock()
    sampler = LogSampler(10.0, clock)
    assert sampler.admit("a") == 0
    assert [sampler.admit("a") for _ in range(5)] == [None] * 5
    assert sampler.admit("b") == 0  # per key
    clock.now += 9.999
    assert sampler.admit("a") is None
    clock.now += 0.001
    assert sampler.admit("a") == 6
    assert sampler.admit("a") is None


# --- the backend with Redis down (a dead port): modes, all or nothing, hooks, no calls while open ------


async def test_open_breaker_skips_redis_until_a_trial(rigs: Callable[..., Rig]) -> None:
    clock = FakeClock()
    rig = rigs(dead_url(), failure_threshold=3, reset_after=5.0, clock=clock)
    lim = gcra("customer", 10)
    for _ in range(3):
        assert (await rig.one(lim, "open"))[1] is True
    assert rig.shared.calls == 3 and not rig.backend.redis_up
    for _ in range(20):
        assert (await rig.one(lim, "open"))[1] is True
    clock.now += 4.9
    await rig.one(lim, "open")
    assert rig.shared.calls == 3  # open: Redis not called, no budget spent
    clock.now += 0.1
    await rig.one(lim, "open")  # the trial (fails: still down) ...
    await rig.one(lim, "open")  # ... and the breaker open again
    assert rig.shared.calls == 4 and not rig.backend.redis_up


async def test_modes_when_redis_is_down(rigs: Callable[..., Rig]) -> None:
    rig = rigs(dead_url(), failure_threshold=1)
    opened, closed, local = gcra("open", 3), gcra("closed", 3), gcra("local", 3)
    for _ in range(5):
        decision, fell_back = await rig.one(opened, "open")
        assert fell_back and decision == Decision("open", True, False, 3, 3, 0.0, 0.0)
        decision, fell_back = await rig.one(closed, "closed")
        assert fell_back and is_unavailable(decision) and decision.enforced_reject
        assert (decision.allowed, decision.retry_after) == (False, 0.0)
    admitted = [(await rig.one(local, "local"))[0] for _ in range(5)]
    assert [d.allowed for d in admitted] == [True] * 3 + [False] * 2
    assert [d.remaining for d in admitted[:3]] == [2, 1, 0]
    assert all(not is_unavailable(d) and d.retry_after > 0 for d in admitted[3:])  # a plain 429
    # An ordinary rejection is not "unavailable"; a shadow policy never blocks, so it is not either.
    assert not is_unavailable(admitted[4])
    shadow = (await rig.one(gcra("dry", 3, shadow=True), "closed"))[0]
    assert isinstance(shadow, Unavailable) and not is_unavailable(shadow) and not shadow.enforced_reject


async def test_all_or_nothing_across_modes(rigs: Callable[..., Rig]) -> None:
    rig = rigs(dead_url(), failure_threshold=1)
    local, closed, dry = gcra("local", 2), gcra("closed", 5), gcra("dry", 5, shadow=True)
    for _ in range(3):  # unavailable: the local limit reports its state but consumes nothing
        decisions, fell_back, _ = await rig.timed([local, closed], ["local", "closed"])
        assert fell_back and decisions[0].allowed and decisions[0].remaining == 1
        assert is_unavailable(decisions[1])
    # A shadow "closed" policy does not block, so the request consumes.
    decisions, _, _ = await rig.timed([local, dry], ["local", "closed"])
    assert decisions[0].remaining == 1 and not is_unavailable(decisions[1])
    decisions, _, _ = await rig.timed([local], ["local"])
    assert decisions[0].allowed and decisions[0].remaining == 0
    # Among local limits: one rejecting means none consumes.
    other = gcra("other", 5)
    decisions, _, _ = await rig.timed([other, local], ["local", "local"])
    assert decisions[0].allowed and not decisions[1].allowed
    decisions, _, _ = await rig.timed([other], ["local"])
    assert decisions[0].remaining == 4  # still the first consumption of `other`


async def test_fallbacks_are_counted_and_logged_sampled(rigs: Callable[..., Rig]) -> None:
    clock = FakeClock()
    rig = rigs(dead_url(), failure_threshold=1, reset_after=60.0, clock=clock)
    a, b = gcra("a", 100), gcra("b", 100)
    with capture_logs() as logs:
        for _ in range(7):
            await rig.backend.check([a, b], ["local", "open"])
        clock.now += 10.0
        await rig.backend.check([a], ["local"])
    assert rig.fallbacks == [("a", "local"), ("b", "open")] * 7 + [("a", "local")]
    lines = [e for e in logs if e["event"] == "ratelimit_fallback"]
    assert [(e["policy"], e["mode"], e["suppressed"]) for e in lines] == [
        ("a", "local", 0), ("b", "open", 0), ("a", "local", 6),
    ]  # fmt: skip
    assert lines[0]["reason"] in ("ConnectionError", "TimeoutError")  # refused (or, rarely, slower)
    assert lines[2]["reason"] == "breaker_open"


async def test_arguments_are_checked(rigs: Callable[..., Rig]) -> None:
    rig = rigs(dead_url())
    assert await rig.backend.check([], []) == ([], False)
    with pytest.raises(ValueError):
        await rig.backend.check([gcra("a", 1)], [])
    with pytest.raises(ValueError):
        await rig.backend.check([gcra("a", 1)], ["lenient"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ResilientBackend(rig.shared, rig.local, budget=0)
    assert rig.shared.calls == 0


@pytest.mark.parametrize("instances", [2, 3])
async def test_local_mode_enforces_limit_over_instances(rigs: Callable[..., Rig], instances: int) -> None:
    rig = rigs(dead_url(), instances=instances, failure_threshold=1)
    burst = gcra("customer", 10)
    results = await asyncio.gather(*(rig.one(burst, "local") for _ in range(12)))  # one burst, concurrent
    assert all(fell_back for _, fell_back in results)
    share = 5 if instances == 2 else 4
    assert sum(d.allowed for d, _ in results) == share
    assert {d.limit for d, _ in results} == {share}
    daily = quota("daily", 100)
    admitted = [(await rig.one(daily, "local"))[0].allowed for _ in range(60)]
    assert sum(admitted) == (50 if instances == 2 else 34)


# --- real faults ---------------------------------------------------------------------------------------


async def test_paused_redis_costs_at_most_the_budget_and_recovery_is_automatic(
    server: RedisProcess, rigs: Callable[..., Rig]
) -> None:
    rig = rigs(server.url, failure_threshold=3, reset_after=0.3, instances=2)
    opened, closed, local = gcra("open", 10), gcra("closed", 10), gcra("local", 10)
    decision, fell_back = await rig.one(opened, "open")
    assert not fell_back and (decision.allowed, decision.remaining) == (True, 9)  # from Redis
    with capture_logs() as logs:
        server.pause()
        try:
            seen = []
            for _ in range(7):
                for lim, mode in ((opened, "open"), (closed, "closed"), (local, "local")):
                    decision, fell_back = await rig.one(lim, mode)  # asserts < budget + slack
                    assert fell_back
                    seen.append((mode, decision))
            assert all(d.allowed and d.remaining == 10 for m, d in seen if m == "open")
            assert all(is_unavailable(d) for m, d in seen if m == "closed")
            assert [d.allowed for m, d in seen if m == "local"] == [True] * 5 + [False] * 2  # 10 / 2
            assert rig.shared.calls == 1 + 3 and not rig.backend.redis_up  # 3 timeouts, then no calls

            await asyncio.sleep(0.3)  # half-open: one trial (times out), the others don't wait for it
            results = await asyncio.gather(*(rig.timed([opened], ["open"]) for _ in range(10)))
            assert all(fell_back and elapsed < SLACK for _, fell_back, elapsed in results)
            assert rig.shared.calls == 1 + 3 + 1 and not rig.backend.redis_up
        finally:
            server.resume()
        await rig.until_redis_decides(gcra("probe", 1000))
        assert rig.backend.redis_up
    events = [
        e["event"] for e in logs if e["event"].startswith("redis_breaker_") and e["log_level"] != "debug"
    ]
    assert events == ["redis_breaker_open", "redis_breaker_closed"]

    # Decided by Redis again: a fresh limit is counted there, not in this process.
    fresh = gcra("fresh", 10)
    entries = len(rig.local)
    remaining = [(await rig.one(fresh, "local"))[0].remaining for _ in range(3)]
    assert remaining == [9, 8, 7]
    assert len(rig.local) == entries
    tat = float(await rig.client.get(fresh.key))  # type: ignore[arg-type]
    seconds, micros = await rig.client.time()
    now = seconds + micros / 1e6
    assert 3 * HOUR - 5 < tat - now <= 3 * HOUR  # three requests' worth of backlog, in Redis


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


async def _written(rig: Rig, round_trips: int) -> None:
    """Lets the loop run until the backend has written one more batch (bounded: a few iterations)."""
    for _ in range(1000):
        if rig.redis.stats.round_trips > round_trips:
            return
        await asyncio.sleep(0)
    raise AssertionError("the check was never written")


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_busy_gateway_never_falls_back_while_redis_answers(server: RedisProcess, loop: str) -> None:
    # The budget is Redis's: from the write of a check to the read of its reply. A process too busy to send
    # (the loop blocked before the write) or to read (blocked after it, the reply waiting in the socket while
    # the deadline passes: uvloop then runs the overdue timer BEFORE it polls the socket) is not a Redis
    # failure: the check is decided by Redis, nothing falls back, the breaker stays closed. Blocking the loop
    # with time.sleep makes both cases certain, not a race.
    blocked: list[bool] = []

    class Blocker(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            server.resume()
            time.sleep(BUDGET * 3)  # the loop is stuck in an I/O callback past the deadline
            blocked.append(True)

    async def scenario() -> None:
        rig = Rig(server.url, failure_threshold=1, reset_after=60.0)
        await asyncio.get_running_loop().create_unix_connection(Blocker, sock=other)
        try:
            lim = gcra("customer", 100)
            assert not (await rig.one(lim, "local"))[1]  # connected, script loaded
            with capture_logs() as logs:
                for remaining in (98, 96):
                    # Blocked before the write.
                    check = asyncio.create_task(rig.backend.check([lim], ["local"]))
                    await asyncio.sleep(0)  # the check is queued, not yet written
                    time.sleep(BUDGET * 1.5)  # noqa: ASYNC251 - the point: the loop is blocked
                    decisions, fell_back = await check
                    assert not fell_back and decisions[0].remaining == remaining
                    # Blocked after the write, inside an I/O callback (as a busy gateway is, parsing
                    # requests), the reply arriving during the block, after that poll gathered its events:
                    # uvloop's next iteration runs the overdue deadline timer before it polls again. Redis is
                    # paused until the block starts, so the reply cannot come earlier.
                    server.pause()
                    trips = rig.redis.stats.round_trips
                    check = asyncio.create_task(rig.backend.check([lim], ["local"]))
                    await _written(rig, trips)
                    busy.send(b"x")  # the other end's data_received resumes Redis, then blocks
                    decisions, fell_back = await check
                    assert blocked and all(blocked), blocked
                    assert not fell_back and decisions[0].remaining == remaining - 1
                    assert rig.backend.redis_up
            assert not [e for e in logs if e["event"] in ("ratelimit_fallback", "redis_breaker_open")]
            assert rig.fallbacks == []
        finally:
            await rig.close()

    busy, other = socket.socketpair()
    try:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(scenario())
    finally:
        busy.close()
        server.resume()


async def test_a_redis_that_does_not_answer_opens_the_breaker(
    server: RedisProcess, rigs: Callable[..., Rig]
) -> None:
    # The other side of the write-to-read budget: a written check with no reply for a budget is Redis's
    # failure, counted by the breaker, and the request falls back within about the budget.
    rig = rigs(server.url, failure_threshold=2, reset_after=60.0)
    lim = gcra("customer", 100)
    assert not (await rig.one(lim, "local"))[1]
    server.pause()
    try:
        up = []
        for _ in range(4):
            assert (await rig.one(lim, "local"))[1]  # asserts < budget + slack
            up.append(rig.backend.redis_up)
        assert up == [True, False, False, False], up
        assert rig.shared.calls == 1 + 2
    finally:
        server.resume()


async def test_a_cancelled_trial_does_not_wedge_the_breaker(
    server: RedisProcess, rigs: Callable[..., Rig]
) -> None:
    rig = rigs(server.url, failure_threshold=1, reset_after=0.0)
    lim = gcra("customer", 100)
    await rig.one(lim, "open")
    server.pause()
    try:
        await rig.one(lim, "open")  # times out: open (reset_after 0: the next request is a trial)
        trial = asyncio.create_task(rig.backend.check([lim], ["open"]))
        await asyncio.sleep(0.01)
        assert rig.shared.calls == 3 and rig.backend.breaker.state == "half_open"
        trial.cancel()  # the request went away (client disconnect), not a verdict on Redis
        with pytest.raises(asyncio.CancelledError):
            await trial
        await rig.one(lim, "open")  # becomes the next trial instead of falling back forever
        assert rig.shared.calls == 4
    finally:
        server.resume()
    await rig.until_redis_decides(lim)


async def test_redis_killed_mid_load(server: RedisProcess, rigs: Callable[..., Rig]) -> None:
    rig = rigs(server.url, failure_threshold=3, reset_after=0.1, instances=2)
    limits = {"open": gcra("open", 100_000), "closed": gcra("closed", 100_000), "local": gcra("local", 10)}
    results: list[tuple[int, str, Decision, bool, float]] = []
    killed_in = 4
    calls_by_round: list[int] = []
    await rig.one(gcra("warm", 10), "closed")  # connected, script loaded

    async def one(round_no: int, mode: str) -> None:
        decisions, fell_back, elapsed = await rig.timed([limits[mode]], [mode])
        results.append((round_no, mode, decisions[0], fell_back, elapsed))

    for round_no in range(30):
        load = asyncio.gather(*(one(round_no, mode) for mode in limits for _ in range(10)))
        if round_no == killed_in:
            await asyncio.sleep(0.002)  # checks in flight
            await asyncio.to_thread(server.kill)
        await load  # no exception escapes
        calls_by_round.append(rig.shared.calls)
        await asyncio.sleep(0.01)

    assert len(results) == 900
    slowest = max(elapsed for *_, elapsed in results)
    assert slowest < SLACK, slowest
    before = [r for r in results if r[0] < killed_in]
    after = [r for r in results if r[0] > killed_in]
    assert not any(fell_back for *_, fell_back, _ in before)
    assert all(fell_back for *_, fell_back, _ in after)
    for _, mode, decision, fell_back, _ in results:
        if fell_back and mode == "open":
            assert decision.allowed and decision.remaining == 100_000
        if fell_back and mode == "closed":
            assert is_unavailable(decision)
        if not fell_back:
            assert not is_unavailable(decision)
    local = [(d.allowed, fell_back) for _, mode, d, fell_back, _ in results if mode == "local"]
    assert sum(allowed for allowed, fell_back in local if not fell_back) == 10  # Redis: the full burst
    assert sum(allowed for allowed, fell_back in local if fell_back) == 5  # this process: 10 / 2
    # The first round after the kill may all reach Redis (permits are taken before the first failure
    # returns); from then on only trials do, one per reset_after: 720 checks, a handful of calls.
    later = calls_by_round[-1] - calls_by_round[killed_in + 1]
    assert later <= 10, later
    assert not rig.backend.redis_up


async def test_redis_restarted_empty_recovers_with_fresh_counts(
    server: RedisProcess, rigs: Callable[..., Rig]
) -> None:
    rig = rigs(server.url, failure_threshold=2, reset_after=0.1)
    lim = gcra("customer", 10)
    assert [(await rig.one(lim, "local"))[0].remaining for _ in range(3)] == [9, 8, 7]
    assert rig.redis.stats.script_loads == 1

    await asyncio.to_thread(server.kill)
    outage = [await rig.one(lim, "local") for _ in range(3)]
    assert all(fell_back and d.allowed for d, fell_back in outage)
    assert [d.remaining for d, _ in outage] == [9, 8, 7]  # counted locally, from zero
    assert not rig.backend.redis_up

    await asyncio.to_thread(server.start)  # same port, empty, no scripts
    await rig.until_redis_decides(gcra("probe", 1000))
    decision, fell_back = await rig.one(lim, "local")
    assert not fell_back and decision.remaining == 9  # a fresh count in the new Redis
    assert rig.redis.stats.script_loads >= 2  # NOSCRIPT: loaded again by RedisBackend
    check = redis.asyncio.Redis(host="127.0.0.1", port=server.port)
    try:
        assert await check.exists(lim.key) == 1
    finally:
        await check.aclose()
