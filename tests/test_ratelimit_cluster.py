"""RedisBackend on a real 3-master Redis Cluster: one EVALSHA per identity, refunds across slots, and a
master failover followed (its replica promoted, the slot map refreshed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.crc import key_slot
from redis.exceptions import SlotNotCoveredError
from redis_server import RedisProcess, redis_cluster, wait_until

from gateway import redis_client
from gateway.ratelimit import Limit, MemoryBackend, RedisBackend
from gateway.ratelimit.redis_backend import REFRESH_INTERVAL
from gateway.ratelimit.resilient import ResilientBackend

HOUR = 3600.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisProcess]]:
    with redis_cluster() as nodes:
        yield nodes


@pytest.fixture
async def client(cluster: list[RedisProcess]) -> AsyncIterator[redis.asyncio.RedisCluster]:
    c = redis.asyncio.RedisCluster(host="127.0.0.1", port=cluster[0].port)
    await c.flushall()
    yield c
    await c.aclose()


def evalsha_calls(cluster: list[RedisProcess]) -> int:
    total = 0
    for node in cluster:
        with redis.Redis(port=node.port) as r:
            total += int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    return total


def gcra(policy: str, limit: int, tag: str, **kw: Any) -> Limit:
    return Limit(policy, f"gw:rl:{{{tag}}}:{policy}", "gcra", limit, rate=1 / HOUR, **kw)


def quota(policy: str, limit: int, tag: str) -> Limit:
    now = time.time()
    return Limit(
        policy, f"gw:rl:{{{tag}}}:{policy}", "quota", limit, window_start=now - 1, window_end=now + HOUR
    )


def test_the_tags_used_here_land_on_different_nodes() -> None:
    # 3 masters split 16384 slots evenly; different nodes make the refund path cross the network.
    assert key_slot(b"{c:1}") // 5462 != key_slot(b"{c:2}") // 5462


async def test_one_identity_is_one_evalsha(
    cluster: list[RedisProcess], client: redis.asyncio.RedisCluster
) -> None:
    await client.hset("gw:ov:{c:1}", "customer:limit", 3)
    backend = RedisBackend(client)
    limits = [
        gcra("customer", 10, "c:1", override_key="gw:ov:{c:1}"),
        quota("daily", 100, "c:1"),
        gcra("dry", 1, "c:1", shadow=True),
    ]
    await backend.check(limits)  # loads the scripts on every primary
    before, trips = evalsha_calls(cluster), backend.stats.round_trips
    results = [await backend.check(limits) for _ in range(3)]
    assert evalsha_calls(cluster) - before == 3
    assert backend.stats.round_trips - trips == 3
    assert [r[0].allowed for r in results] == [True, True, False]  # the override: 3 in all
    assert results[0][0].limit == 3
    await backend.close()


@pytest.mark.parametrize("kind", ["quota", "gcra"])
async def test_requests_spanning_slots_are_all_or_nothing(
    kind: str, cluster: list[RedisProcess], client: redis.asyncio.RedisCluster
) -> None:
    make = quota if kind == "quota" else gcra
    small, large = make("customer", 10, "c:1"), make("tenant", 20, "c:2")
    backend = RedisBackend(client)
    # Half the requests list the limits the other way round: the order must not matter.
    results = await asyncio.gather(
        *(backend.check([small, large] if i % 2 else [large, small]) for i in range(50))
    )
    admitted = sum(all(d.allowed for d in r) for r in results)
    assert admitted == 10
    # Every rejected request gave back what the other slot had taken: exactly 10 consumed on each side.
    if kind == "quota":
        assert [int(await client.get(lim.storage_key)) for lim in (small, large)] == [10, 10]
    else:
        probe = (await backend.check([large]))[0]
        assert (probe.allowed, probe.remaining) == (True, 20 - 10 - 1)
        assert not (await backend.check([small]))[0].allowed
    assert backend.stats.commands < 50 * 2 + 50  # 2 checks per request, refunds only where needed
    await backend.close()


async def test_shadow_limit_in_another_slot_is_refunded(client: redis.asyncio.RedisCluster) -> None:
    backend = RedisBackend(client)
    real, dry = gcra("customer", 2, "c:1"), gcra("dry", 100, "c:2", shadow=True)
    results = [await backend.check([real, dry]) for _ in range(5)]
    assert [r[0].allowed for r in results] == [True, True, False, False, False]
    assert all(r[1].allowed for r in results)  # the shadow limit would admit each of them...
    assert (await backend.check([dry]))[0].remaining == 100 - 2 - 1  # ...but only kept the admitted two
    await backend.close()


async def test_noscript_recovery_on_every_node(client: redis.asyncio.RedisCluster) -> None:
    backend = RedisBackend(client)
    limits = [gcra("customer", 5, "c:1"), gcra("tenant", 1, "c:2")]
    await backend.check(limits)
    await client.script_flush()  # every primary forgets both scripts
    # Rejected by "tenant": the refund script must be reloaded as well.
    decisions = await backend.check(limits)
    assert [d.allowed for d in decisions] == [True, False]
    assert (await backend.check(limits[:1]))[0].remaining == 3
    await backend.close()


async def test_override_outside_the_limits_slot_is_refused(client: redis.asyncio.RedisCluster) -> None:
    backend = RedisBackend(client)
    with pytest.raises(ValueError, match="hash tag"):
        await backend.check([gcra("customer", 5, "c:1", override_key="gw:ov:{c:2}")])
    await backend.close()


async def test_cluster_client_errors_are_redis_errors(
    client: redis.asyncio.RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py's RedisClusterException is not a RedisError: raised as is, the caller would not fall back.
    backend = RedisBackend(client)
    await backend.check([gcra("customer", 5, "c:1")])

    def uncovered(self: Any, slot: int, *args: Any, **kwargs: Any) -> Any:
        raise SlotNotCoveredError(f'Slot "{slot}" not covered by the cluster.')

    monkeypatch.setattr(type(client.nodes_manager), "get_node_from_slot", uncovered)
    with pytest.raises(redis.exceptions.ClusterError, match="SlotNotCoveredError"):
        await backend.check([gcra("customer", 5, "c:1")])
    await backend.close()


# --- failover ---------------------------------------------------------------------------------------------


@pytest.fixture
def failover_cluster() -> Iterator[list[RedisProcess]]:
    """3 masters and a replica of the first (nodes[3]); function-scoped: the test kills a master."""
    with redis_cluster(masters=3, replicas=1) as nodes:
        yield nodes


def tag_served_by(node: RedisProcess, seen_from: RedisProcess) -> str:
    """A hash tag whose slot `node` serves, as `seen_from` knows the cluster."""
    with redis.Redis(port=seen_from.port) as r:
        ranges = [(start, end) for start, end, owner, *_ in r.cluster("slots") if owner[1] == node.port]
    for i in range(10_000):
        if any(start <= key_slot(f"c:{i}".encode()) <= end for start, end in ranges):
            return f"c:{i}"
    raise AssertionError(f"no slot served by port {node.port}")


def serves(node: RedisProcess, key: str, seen_from: list[RedisProcess]) -> bool:
    """Every node of `seen_from` says `node` alone serves the slot of `key`."""
    slot = key_slot(key.encode())
    for other in seen_from:
        with redis.Redis(port=other.port) as r:
            owners = [owner[1] for start, end, owner, *_ in r.cluster("slots") if start <= slot <= end]
        if owners != [node.port]:
            return False
    return True


async def test_a_master_failover_is_followed(failover_cluster: list[RedisProcess]) -> None:
    master, healthy, _, replica = failover_cluster
    # The gateway's own client (timeouts, retry policy), started from a node that stays up.
    client = redis_client.connect(f"redis+cluster://127.0.0.1:{healthy.port}")
    backend = RedisBackend(client)
    # A budget no busy box misses, and a breaker that trials again soon: fell_back then means Redis failed.
    resilient = ResilientBackend(backend, MemoryBackend(), budget=2.0, failure_threshold=3, reset_after=0.05)
    moved = gcra("customer", 1000, tag_served_by(master, healthy))
    stayed = gcra("tenant", 1000, tag_served_by(healthy, healthy))

    async def redis_decides(limit: Limit) -> bool:
        decisions, fell_back = await resilient.check([limit], ["local"])
        return not fell_back and decisions[0].allowed

    try:
        assert await redis_decides(moved) and await redis_decides(stayed)

        outage = time.monotonic()
        master.kill()
        for _ in range(20):  # the dead master's slots fail, the others do not (the breaker aside)
            with pytest.raises(redis.RedisError):
                await backend.check([moved])
        assert (await backend.check([stayed]))[0].allowed

        with redis.Redis(port=replica.port) as r:
            r.cluster("failover", "takeover")  # deterministic: no election, no node timeout to wait for
        wait_until(lambda: serves(replica, moved.key, failover_cluster[1:]), what="the replica promoted")

        # Checks on the dead master's slots are Redis's again, on the new master: the slot map was refreshed
        # (no MOVED can tell, nothing answers at the old address). Bounded in checks and in time.
        deadline, attempts = time.monotonic() + 10, 0
        while not await redis_decides(moved):
            attempts += 1
            assert attempts < 500 and time.monotonic() < deadline, f"still falling back ({attempts} checks)"
            await asyncio.sleep(0.01)
        with redis.Redis(port=replica.port) as r:
            assert r.exists(moved.storage_key)
        assert await redis_decides(stayed)
        # Refreshes were paced (at most one a second): the ~100 failed checks above did not each start one.
        assert 1 <= backend.stats.topology_refreshes <= 2 + (time.monotonic() - outage) / REFRESH_INTERVAL
    finally:
        await resilient.close()
        await client.aclose()
