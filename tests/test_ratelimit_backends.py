"""One contract for both backends (memory on a fake clock, Redis on a real redis-server), then Redis only:
round trips, coalescing, NOSCRIPT recovery, key layout and expiry, and the Lua script checked against the
Python reference at identical fixed times.

Redis server time cannot be faked, so the contract uses rates of one request per hour: a test takes far less
than one emission interval, counts are exact and times are right to a few seconds.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis_server import RedisProcess, free_port

from gateway import redis_client
from gateway.ratelimit import Backend, Limit, MemoryBackend, RedisBackend
from gateway.ratelimit.algorithms import QUOTA_GRACE, fixed_window

HOUR = 3600.0
SLOW = 1 / HOUR  # requests per second: time between calls in a test is irrelevant


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    backend: Backend
    set_override: Callable[[str, str, str | float], Awaitable[Any]]

    async def one(self, limit: Limit) -> Any:
        return (await self.backend.check([limit]))[0]


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        memory = MemoryBackend(clock=FakeClock(time.time()))

        async def set_memory(key: str, name: str, value: str | float) -> None:
            memory.set_override(key, name, value)

        yield Harness(memory, set_memory)
        await memory.close()
        return
    client = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
    backend = RedisBackend(client)
    yield Harness(backend, lambda key, name, value: client.hset(key, name, value))
    await backend.close()
    await client.aclose()


def gcra(policy: str, limit: int, *, tag: str = "c:42", **kw: Any) -> Limit:
    return Limit(policy, f"gw:rl:{{{tag}}}:{policy}", "gcra", limit, rate=kw.pop("rate", SLOW), **kw)


def quota(policy: str, limit: int, *, tag: str = "c:42", length: float = HOUR, **kw: Any) -> Limit:
    start, end = fixed_window(time.time(), length)
    key = f"gw:rl:{{{tag}}}:{policy}"
    return Limit(policy, key, "quota", limit, window_start=start, window_end=end, **kw)


# --- the contract ----------------------------------------------------------------------------------------


async def test_burst_then_reject(harness: Harness) -> None:
    lim = gcra("customer", 5)
    decisions = [await harness.one(lim) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert all(d.limit == 5 and not d.shadow for d in decisions)
    assert decisions[0].reset_after == pytest.approx(HOUR, abs=5)
    assert decisions[4].reset_after == pytest.approx(5 * HOUR, abs=5)
    # One emission interval until one more request fits; nothing consumed by the rejections.
    assert decisions[5].retry_after == pytest.approx(HOUR, abs=5)
    assert decisions[6].retry_after == pytest.approx(HOUR, abs=5)
    assert decisions[6].reset_after == pytest.approx(5 * HOUR, abs=5)


async def test_fast_rates_admit_the_burst_exactly(harness: Harness) -> None:
    # 2/s burst 20: refilling one request takes 0.5 s, far longer than these checks.
    lim = gcra("ip", 20, rate=2.0, tag="ip:10.0.0.1")
    allowed = [(await harness.one(lim)).allowed for _ in range(21)]
    assert allowed == [True] * 20 + [False]
    assert (await harness.one(lim)).retry_after == pytest.approx(0.5, abs=0.1)


async def test_all_or_nothing(harness: Harness) -> None:
    a, b = gcra("a", 2), quota("b", 5)
    results = [await harness.backend.check([a, b]) for _ in range(4)]
    assert [[d.allowed for d in r] for r in results] == [[True, True]] * 2 + [[False, True]] * 2
    # The rejected requests took nothing from b: 2 used, this one makes 3, so 2 left.
    assert (await harness.one(b)).remaining == 2
    assert not (await harness.one(a)).allowed


async def test_shadow_counts_but_never_blocks(harness: Harness) -> None:
    real, dry = gcra("real", 4), gcra("dry", 2, shadow=True)
    results = [await harness.backend.check([dry, real]) for _ in range(6)]
    assert [r[1].allowed for r in results] == [True] * 4 + [False] * 2
    assert [(r[0].allowed, r[0].shadow) for r in results[:4]] == [(True, True)] * 2 + [(False, True)] * 2
    # A shadow limit that rejects consumes nothing, nor does any request the real limit rejected.
    probe = await harness.one(gcra("dry", 3, shadow=True))
    assert (probe.allowed, probe.remaining) == (True, 0)


async def test_cost(harness: Harness) -> None:
    lim = gcra("bulk", 5, cost=3)
    first, second = await harness.one(lim), await harness.one(lim)
    assert (first.allowed, first.remaining) == (True, 2)
    assert (second.allowed, second.remaining) == (False, 0)
    assert second.retry_after == pytest.approx(HOUR, abs=5)  # one more interval makes room for 3
    assert not (await harness.one(gcra("huge", 5, cost=6))).allowed  # larger than the burst: never
    assert not (await harness.one(quota("huge-q", 5, cost=6))).allowed
    assert (await harness.one(quota("q", 5, cost=2))).remaining == 3


async def test_same_key_twice_in_one_request(harness: Harness) -> None:
    lim = gcra("twice", 3)
    first = await harness.backend.check([lim, lim])
    assert [(d.allowed, d.remaining) for d in first] == [(True, 2), (True, 1)]
    second = await harness.backend.check([lim, lim])
    assert [d.allowed for d in second] == [True, False]
    assert (await harness.one(lim)).remaining == 0  # the rejected pair consumed nothing


async def test_overrides(harness: Harness) -> None:
    ov = "gw:ov:{c:42}"
    lim = gcra("customer", 10, rate=1.0, override_key=ov)
    await harness.set_override(ov, "customer:limit", 2)
    await harness.set_override(ov, "customer:rate", str(SLOW))
    decisions = [await harness.one(lim) for _ in range(3)]
    assert [(d.allowed, d.limit) for d in decisions] == [(True, 2), (True, 2), (False, 2)]
    assert decisions[2].retry_after == pytest.approx(HOUR, abs=5)  # the overridden rate
    await harness.set_override(ov, "customer:limit", "not-a-number")  # unusable: configured 10 stands
    assert (await harness.one(lim)).limit == 10
    q = quota("daily", 100, override_key=ov)
    await harness.set_override(ov, "daily:limit", "1.9")  # floored
    assert [(await harness.one(q)).allowed for _ in range(2)] == [True, False]


async def test_quota_counts_per_window(harness: Harness) -> None:
    lim = quota("day", 3)
    decisions = [await harness.one(lim) for _ in range(4)]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert not decisions[3].allowed
    expected = lim.window_end - time.time()
    assert decisions[3].retry_after == pytest.approx(expected, abs=5)
    assert decisions[0].reset_after == pytest.approx(expected, abs=5)
    # The next window is another counter, starting at zero.
    nxt = Limit("day", lim.key, "quota", 3, window_start=lim.window_end, window_end=lim.window_end + HOUR)
    assert (await harness.one(nxt)).remaining == 2


async def test_no_limits(harness: Harness) -> None:
    assert await harness.backend.check([]) == []


# --- Redis only ------------------------------------------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(redis_url)
    yield c
    await c.aclose()


class CountingClient:
    """The real client, counting round trips so nothing relies on the backend's stats: pipelines, and writes
    to the connections its pool hands out (RedisBackend writes each batch of checks in one write)."""

    def __init__(self, inner: redis.asyncio.Redis) -> None:
        self.inner = inner
        self.pipelines = 0
        self.connection_pool = CountingPool(inner.connection_pool, self)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.pipelines += 1
        return self.inner.pipeline(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CountingPool:
    def __init__(self, inner: Any, owner: CountingClient) -> None:
        self.inner = inner
        self.owner = owner

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        conn = await self.inner.get_connection(*args, **kwargs)
        transport = conn._writer.transport
        write = transport.write

        def counting_write(data: bytes) -> None:
            self.owner.pipelines += 1
            write(data)

        transport.write = counting_write
        return conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def command_calls(client: redis.asyncio.Redis, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_one_evalsha_per_check_for_many_limits(client: redis.asyncio.Redis) -> None:
    counting = CountingClient(client)
    backend = RedisBackend(cast(redis.asyncio.Redis, counting))
    await client.hset("gw:ov:{c:1}", "customer:limit", 50)
    limits = [
        gcra("customer", 10, tag="c:1", override_key="gw:ov:{c:1}"),
        gcra("ip", 100, rate=100.0, tag="c:1"),
        quota("daily", 1000, tag="c:1"),
        gcra("dry", 1, tag="c:1", shadow=True),
    ]
    await backend.check(limits)  # loads the script
    evalsha, pipelines = await command_calls(client, "evalsha"), counting.pipelines
    for _ in range(5):
        decisions = await backend.check(limits)
        assert decisions[0].limit == 50
    assert await command_calls(client, "evalsha") - evalsha == 5
    assert counting.pipelines - pipelines == 5
    assert backend.stats.script_loads == 1
    await backend.close()


async def test_concurrent_checks_are_coalesced(client: redis.asyncio.Redis) -> None:
    counting = CountingClient(client)
    backend = RedisBackend(cast(redis.asyncio.Redis, counting))
    await backend.check([gcra("warm", 1)])
    before = counting.pipelines
    shared = gcra("customer", 150)
    results = await asyncio.gather(*(backend.check([shared, gcra(f"ip{i}", 5)]) for i in range(200)))
    assert sum(all(d.allowed for d in r) for r in results) == 150  # exact, batched or not
    burst_trips = counting.pipelines - before
    assert burst_trips <= 2

    # Requests trickling in while round trips are in flight: 200 workers, each a few checks in a row.
    before, commands = counting.pipelines, backend.stats.commands

    async def worker(i: int) -> None:
        for _ in range(5):
            await backend.check([gcra(f"w{i}", 100)])

    await asyncio.gather(*(worker(i) for i in range(200)))
    trips = counting.pipelines - before
    assert backend.stats.commands - commands == 1000
    assert trips <= 20, trips  # ~200 per pipeline expected; one per request would be 1000
    print(f"\ncoalescing: 200 at once -> {burst_trips} round trip(s); 200 workers x 5 -> {trips} round trips")
    await backend.close()


async def test_noscript_recovery_after_script_flush(client: redis.asyncio.Redis) -> None:
    backend = RedisBackend(client)
    lim = gcra("customer", 100)
    await backend.check([lim])
    await client.script_flush()
    assert (await backend.check([lim])).pop().remaining == 98
    assert backend.stats.script_loads == 2
    await client.script_flush()
    # A whole pipeline hit by NOSCRIPT: one reload, one retry, every request answered.
    results = await asyncio.gather(*(backend.check([lim]) for _ in range(50)))
    assert sorted(r[0].remaining for r in results) == list(range(48, 98))
    assert backend.stats.script_loads == 3
    await backend.close()


async def test_keys_carry_the_hash_tag_and_expire(client: redis.asyncio.Redis) -> None:
    backend = RedisBackend(client)
    rate = gcra("customer", 20, rate=10.0, tag="c:7")
    day = quota("daily", 10, tag="c:7", length=86400.0)
    for _ in range(3):
        decisions = await backend.check([rate, day])
    keys = sorted(k.decode() for k in await client.keys("*"))
    assert keys == sorted([rate.key, day.storage_key]) and all("{c:7}" in k for k in keys)
    # The TAT lives until the bucket is full again: 3 requests at 10/s.
    assert 0 < await client.pttl(rate.key) <= math.ceil(decisions[0].reset_after * 1000) <= 300
    assert await client.pexpiretime(day.storage_key) == math.ceil((day.window_end + QUOTA_GRACE) * 1000)
    assert int(await client.get(day.storage_key)) == 3
    await asyncio.sleep(0.35)
    assert await client.exists(rate.key) == 0  # full again: gone
    await backend.close()


async def test_errors_propagate(client: redis.asyncio.Redis) -> None:
    down = redis.asyncio.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    with pytest.raises(RedisConnectionError):
        await RedisBackend(down).check([gcra("customer", 5)])
    await down.aclose()

    # A command that fails fails only its own request, not the others in the same pipeline.
    backend = RedisBackend(client)
    await client.hset("gw:rl:{c:bad}:customer", "x", 1)
    bad, good = gcra("customer", 5, tag="c:bad"), gcra("customer", 5)
    results = await asyncio.gather(
        backend.check([bad]), *(backend.check([good]) for _ in range(3)), return_exceptions=True
    )
    assert isinstance(results[0], ResponseError)
    assert [r[0].remaining for r in results[1:]] == [4, 3, 2]  # type: ignore[index]
    await backend.close()


async def test_a_stalled_redis_times_out_every_check_in_the_batch() -> None:
    server = RedisProcess().start()
    client = redis.asyncio.Redis(port=server.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    backend = RedisBackend(client)
    try:
        lim = gcra("customer", 100)
        await backend.check([lim])
        server.pause()
        results = await asyncio.gather(*(backend.check([lim]) for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        server.resume()
        assert (await backend.check([lim]))[0].allowed  # the next round trip reconnects
    finally:
        await backend.close()
        await client.aclose()
        server.stop()


@pytest.mark.parametrize("ticks", [1, 3], ids=["queued", "in-flight"])
async def test_close_cancels_pending_checks(client: redis.asyncio.Redis, ticks: int) -> None:
    backend = RedisBackend(client)
    tasks = [asyncio.create_task(backend.check([gcra("customer", 100)])) for _ in range(10)]
    for _ in range(ticks):  # 1: the flusher has not started yet; 3: it is waiting on Redis
        await asyncio.sleep(0)
    await backend.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    if ticks == 1:
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
    else:  # cancelled, or answered if the replies won the race: never left hanging
        assert all(isinstance(r, asyncio.CancelledError | list) for r in results)
    assert (await backend.check([gcra("customer", 100)]))[0].allowed  # and it can still be used after


async def test_a_cancelled_check_does_not_disturb_the_others(client: redis.asyncio.Redis) -> None:
    backend = RedisBackend(client)
    lim = gcra("customer", 100)
    tasks = [asyncio.create_task(backend.check([lim])) for _ in range(10)]
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert sorted(r[0].remaining for i, r in enumerate(done) if i != 3) == list(range(91, 100))  # type: ignore[index]
    await backend.close()


# Emission intervals of at least a second: the script sets PX from the fake time's backlog, but Redis
# expires keys in real time, so an interval must outlast each example.
SLOW_RATES = st.sampled_from([(1.0, 1.0), (0.5, 1.0), (3.0, 60.0), (7.0, 60.0), (60.0, 60.0)])


@st.composite
def request_limits(draw: st.DrawFn) -> list[tuple[str, int, float, float, bool, bool]]:
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(["gcra", "gcra", "quota"]),
                st.integers(0, 6),
                SLOW_RATES,
                st.booleans(),  # shadow
                st.booleans(),  # with override
            ).map(lambda t: (t[0], t[1], t[2][0], t[2][1], t[3], t[4])),
            min_size=1,
            max_size=4,
        )
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=request_limits(),
    override=st.sampled_from([0, 1, 2, 5, 8, "2.5", "0.7", "-1", "inf", "x"]),
    steps=st.lists(st.tuples(st.integers(0, 1500), st.integers(1, 3), st.integers(1, 15)), max_size=25),
)
async def test_lua_matches_the_python_reference(
    redis_url: str,
    specs: list[tuple[str, int, float, float, bool, bool]],
    override: int | str,
    steps: list[tuple[int, int, int]],
) -> None:
    """Same limits, same times (the backend's test clock), bit-identical decisions."""
    clock = FakeClock(time.time())
    client = redis.asyncio.Redis.from_url(redis_url)
    remote, local = RedisBackend(client, clock=clock), MemoryBackend(clock=clock)
    prefix = uuid.uuid4().hex
    ov = f"gw:ov:{{{prefix}}}"
    await client.hset(ov, mapping={"p0:limit": override, "p1:rate": override})
    for name in ("p0:limit", "p1:rate"):
        local.set_override(ov, name, override)
    try:
        for step_ms, cost, mask in steps:
            clock.now += step_ms / 1000
            start, end = fixed_window(clock.now - 1.0, 5.0)  # at times a stale window: now >= window_end
            limits = [
                Limit(
                    f"p{i}",
                    f"gw:rl:{{{prefix}}}:{i % 3}",  # limits 0 and 3 share a key
                    algorithm,  # type: ignore[arg-type]
                    limit,
                    rate=rate,
                    period=period,
                    window_start=start,
                    window_end=end,
                    cost=cost,
                    shadow=shadow,
                    override_key=ov if with_override else None,
                )
                for i, (algorithm, limit, rate, period, shadow, with_override) in enumerate(specs)
                if mask >> i & 1
            ]
            assert await remote.check(limits) == await local.check(limits)
    finally:
        await remote.close()
        await client.aclose()


async def test_pushed_frames_never_take_a_replys_place(redis_url: str) -> None:
    """redis-py speaks RESP3, where a server may push frames no command asked for (client-tracking
    invalidations here, maintenance notices elsewhere): each check still gets its own reply."""
    client = redis_client.connect(redis_url)
    backend = RedisBackend(client)
    tracker = redis.Redis.from_url(redis_url, decode_responses=True)
    tag = uuid.uuid4().hex

    def limit(who: str, burst: int) -> Limit:
        return Limit(policy="p", key=f"gw:rl:{{c:{tag}{who}}}:p", algorithm="gcra", limit=burst, rate=0.001)

    try:
        await backend.check([limit("warmup", 1000)], budget=5.0)
        # Every change to X's key now pushes an invalidation onto the backend's own connection.
        port = backend._pipes[""].link.transport.get_extra_info("sockname")[1]
        (link_id,) = [c["id"] for c in tracker.client_list() if c["addr"].endswith(f":{port}")]
        tracker.execute_command("CLIENT", "TRACKING", "ON", "REDIRECT", link_id)
        tracker.get(limit("x", 1).storage_key)
        for round_ in range(3):
            x, y = await asyncio.gather(
                backend.check([limit("x", 1)], budget=5.0),
                backend.check([limit(f"y{round_}", 100)], budget=5.0),
            )
            assert (x[0].limit, x[0].allowed) == (1, round_ == 0)
            assert (y[0].limit, y[0].remaining) == (100, 99), "a check was handed another check's reply"
            tracker.get(limit("x", 1).storage_key)  # tracked again for the next round
    finally:
        tracker.close()
        await backend.close()
        await client.aclose()
