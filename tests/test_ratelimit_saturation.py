"""Shared limits stay exact at saturation, with the DEFAULT config (250 ms redis_budget, breaker defaults).

Four gateways (four `serve` processes, and one `serve --workers 4` supervisor) on one real Redis and on a
real 3-master Cluster, ~100 loopback clients driving them flat out, on a box kept busy by a CPU hog (a
`while 1: pass` process started here, killed by pid at teardown). The budget is measured from the write of
a check to the read of its reply, so event-loop queueing on these saturated gateways must never make a
check fall back while Redis answers:

- a fixed burst (GCRA, burst 100, one request per hour: the bucket cannot refill during the test) admits
  exactly 100, and the admitted X-RateLimit-Remaining values are exactly 0..99 (one serialised count);
- a monthly quota of 150 admits exactly 150, the same way;
- a 20/s GCRA with a burst of 20, driven for a bounded time, never admits more than GCRA allows over the
  time the load took (burst + rate x elapsed);
- no gateway logs a fallback or a breaker change.

Every loop is bounded in count and time; nothing depends on how fast the box is (demand is 3x each limit,
and the rate phase is judged against its own measured duration).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml
from redis_server import RedisProcess, free_ports, redis_cluster
from test_ratelimit_accuracy import (
    LOOPBACK,
    NOT_REDIS_EVENTS,
    ROOT,
    Answer,
    GatewayProcess,
    wait_healthy,
)
from upstream_server import UpstreamServer

INSTANCES = 4
CLIENTS = 100
BURST = 100  # the fixed burst
QUOTA = 150  # the monthly quota
RATE, RATE_BURST = 20.0, 20  # the rate policy: 20/s, burst 20
RATE_SECONDS = 1.5  # how long the rate phase drives it
DEMAND = 3
START_TIMEOUT = 30.0
LOAD_TIMEOUT = 60.0
REQUEST_TIMEOUT = 20.0


def gateway_config(redis_url: str) -> dict[str, Any]:
    # Only what the scenario needs: redis_budget, breaker and instances keep their defaults.
    return {
        "redis": {"url": redis_url},
        "rate_limit": {
            "policies": {
                "burst": {"key": ["route"], "rate": 1, "period": 3600, "burst": BURST},
                "monthly": {"key": ["route"], "algorithm": "quota", "window": "month", "limit": QUOTA},
                "rate": {"key": ["route"], "rate": RATE, "period": 1, "burst": RATE_BURST},
            },
        },
        "routes": [
            {"name": "burst", "path": "/echo/burst", "auth": "none", "rate_limit": ["burst"]},
            {"name": "quota", "path": "/echo/quota", "auth": "none", "rate_limit": ["monthly"]},
            {"name": "rate", "path": "/echo/rate", "auth": "none", "rate_limit": ["rate"]},
            {"name": "other", "prefix": "/", "auth": "none"},
        ],
    }


@pytest.fixture(scope="module")
def cpu_hog() -> Iterator[None]:
    """Keeps one of the box's cores busy for the whole module."""
    hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait(timeout=10)


@pytest.fixture(scope="module")
def one_redis() -> Iterator[str]:
    server = RedisProcess().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with redis_cluster() as nodes:
        yield "redis+cluster://" + ",".join(f"{LOOPBACK}:{node.port}" for node in nodes)


def flush(url: str) -> None:
    if url.startswith("redis+cluster://"):
        host, _, port = url.removeprefix("redis+cluster://").split(",")[0].rpartition(":")
        with redis.RedisCluster(host=host, port=int(port)) as client:
            client.flushall()
    else:
        with redis.Redis.from_url(url) as client:
            client.flushall()


@contextlib.asynccontextmanager
async def gateways(
    tmp_path: Path, redis_url: str, upstream_url: str, mode: str
) -> AsyncIterator[list[GatewayProcess]]:
    """Four `serve` processes, or one `serve --workers 4`; all killed (process groups) on the way out."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(redis_url)), encoding="utf-8")
    started: list[GatewayProcess] = []
    try:
        for i in range(INSTANCES if mode == "processes" else 1):
            port, admin_port = free_ports(2)
            stdout, stderr = tmp_path / f"gw{i}.out", tmp_path / f"gw{i}.err"
            workers = ["--workers", str(INSTANCES)] if mode == "workers" else []
            with stdout.open("wb") as out, stderr.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "serve", "--config", str(config),
                    "--listen", f"{LOOPBACK}:{port}", "--admin-listen", f"{LOOPBACK}:{admin_port}",
                    "--upstream", upstream_url, *workers,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT, start_new_session=True,
                )  # fmt: skip
            started.append(GatewayProcess(proc, port, admin_port, stdout, stderr))
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(wait_healthy(session, gw) for gw in started))
            if mode == "workers":
                await all_workers_started(started[0])
        yield started
    finally:
        for gw in started:
            await gw.kill()


async def all_workers_started(gw: GatewayProcess) -> None:
    """Each worker logs gateway_started once it listens: wait for all four (bounded)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        pids = {e.get("pid") or e.get("worker_pid") for e in gw.logs() if e.get("event") == "gateway_started"}
        if len(pids) >= INSTANCES:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not all {INSTANCES} workers started\n{gw.output()}")


async def drive(gws: Sequence[GatewayProcess], path: str, *, total: int | None, seconds: float | None):
    """CLIENTS keep-alive clients, client i on gateway i % len(gws), until `total` requests were issued or
    `seconds` passed. Returns the answers and the seconds from the first send to the last answer."""
    answers: list[Answer] = []
    issued = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        session._retry_connection = False  # one request must be exactly one request (see accuracy test)
        started = time.monotonic()
        stop_at = None if seconds is None else started + seconds

        async def client(i: int) -> None:
            nonlocal issued
            gw = i % len(gws)
            url = gws[gw].url + path
            while (total is None or issued < total) and (stop_at is None or time.monotonic() < stop_at):
                issued += 1
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as resp:
                    body = await resp.read()
                    answers.append(Answer(gw, resp.status, dict(resp.headers), body))

        async with asyncio.timeout(LOAD_TIMEOUT):
            await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        elapsed = time.monotonic() - started
    assert len(answers) == issued
    return answers, elapsed


def assert_exact(answers: list[Answer], limit: int) -> None:
    statuses = collections.Counter(a.status for a in answers)
    summary = f"statuses {dict(statuses)}"
    assert set(statuses) <= {200, 429}, summary
    assert statuses[200] == limit, summary  # +0, and no false rejection with 3x demand
    remaining = sorted(int(a.headers["X-RateLimit-Remaining"]) for a in answers if a.status == 200)
    assert remaining == list(range(limit)), "admissions were not counted by one shared, serialised count"
    assert {a.headers.get("X-RateLimit-Limit") for a in answers} == {str(limit)}


def assert_redis_decided(gws: Sequence[GatewayProcess]) -> None:
    for gw in gws:
        bad = [e for e in gw.logs() if e.get("event") in NOT_REDIS_EVENTS or e.get("level") in ("error",)]
        assert not bad, f"a shared limit was not decided by Redis: {bad[:5]}\n{gw.output()}"
        assert gw.proc.returncode is None, gw.output()


@pytest.mark.slow  # subprocess gateways, a CPU hog and (for one store) a cluster
@pytest.mark.parametrize("mode", ["processes", "workers"])
@pytest.mark.parametrize("store", ["redis", "cluster"])
async def test_saturated_gateways_admit_exactly_the_limit(
    tmp_path: Path, cpu_hog: None, store: str, mode: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("one_redis" if store == "redis" else "cluster_url")
    flush(url)  # the module's Redis (or Cluster) serves every variant: each starts from empty buckets
    async with UpstreamServer() as upstream, gateways(tmp_path, url, upstream.url, mode) as gws:
        # The fixed burst and the quota: exactly the limit.
        answers, _ = await drive(gws, "/echo/burst", total=DEMAND * BURST, seconds=None)
        assert_exact(answers, BURST)
        answers, _ = await drive(gws, "/echo/quota", total=DEMAND * QUOTA, seconds=None)
        assert_exact(answers, QUOTA)
        # The rate: never more than GCRA allows over the time the load took.
        answers, elapsed = await drive(gws, "/echo/rate", total=None, seconds=RATE_SECONDS)
        admitted = sum(a.status == 200 for a in answers)
        allowed = RATE_BURST + math.floor(RATE * elapsed)
        assert RATE_BURST <= admitted <= allowed, (admitted, allowed, elapsed)
        assert set(collections.Counter(a.status for a in answers)) <= {200, 429}
        assert_redis_decided(gws)
