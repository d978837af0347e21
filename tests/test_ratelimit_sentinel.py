"""Rate limits over a `redis+sentinel://` URL: a real redis-server in Sentinel mode, started on loopback,
names the master the gateway then counts in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis_server import RedisProcess, redis_sentinel
from test_ratelimit_gateway import FROZEN, SECRET, bearer, config, statuses


@pytest.fixture
def sentinel_url() -> Iterator[tuple[str, RedisProcess]]:
    master = RedisProcess().start()
    try:
        with redis_sentinel(master, "limits") as port:
            yield f"redis+sentinel://127.0.0.1:{port}/limits", master
    finally:
        master.stop()


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv("RL_TEST_SECRET", SECRET)


async def test_counts_go_to_the_master_sentinel_names(upstream, make_gateway, client, sentinel_url):
    url, master = sentinel_url
    settings = config({"cust": {"key": ["customer"], "burst": 2, **FROZEN}}, {"rate_limit": ["cust"]})
    one = await make_gateway(upstream.url, redis={"url": url}, **settings)
    two = await make_gateway(upstream.url, redis={"url": url}, **settings)
    results = []
    for gw in (one, two, one):
        results += await statuses(client, gw, 1, bearer())
    assert results == [200, 200, 429]  # one count for both instances: Redis decided, not a fallback
    direct = redis.Redis(host="127.0.0.1", port=master.port, decode_responses=True)
    try:
        assert direct.keys("gw:rl:*") == ["gw:rl:{c:c1}:cust"]
    finally:
        direct.close()
