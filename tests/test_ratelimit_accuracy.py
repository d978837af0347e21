"""Shared rate limits are exact across gateway instances, as an operator runs them.

Four `python -m gateway serve` processes share one real Redis (standalone, then a real 3-master Cluster);
100 concurrent loopback clients spread over the four send a bounded number of requests, three times the limit.
The limits are GCRA with a rate of one request per hour, so the window is frozen for the test and the shared
count must come out exact: exactly `burst` admitted (never more, never fewer: no false rejections with demand
above the limit), every other request a canonical 429. A monthly calendar quota is held to the same standard.

Redis must decide every request, which the test proves rather than assumes: `rate_limit.instances` is 4, so a
fallback to memory would answer X-RateLimit-Limit burst/4 (and, four shares of 50 making 200, could even get
the count right); on one slot, the admitted requests' X-RateLimit-Remaining values are exactly 0..burst-1
across the four processes (one count, serialised by Redis) and Redis ran one EVALSHA per request; and no
fallback, breaker or refund-failure line is logged.

On the Cluster, a route whose two policies (keyed by `ip` and by `route`) hash to slots on different nodes
exercises the refund path: admitted never exceeds either limit, and once every answer is in, the larger
limit's bucket holds exactly the admitted requests (every rejected request's consumption was given back).

Every gateway is a subprocess on free loopback ports, in its own session, SIGKILLed with its process group
at teardown; every wait and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml
from redis.crc import key_slot
from redis_server import RedisProcess, free_ports, redis_cluster
from upstream_server import UpstreamServer

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

INSTANCES = 4
CLIENTS = 100
BURST = 200  # the catch-all's limit: requests admitted at once from idle
PERIOD = 3600.0  # rate 1 per hour: the emission interval (3600 s) dwarfs the test, the window is frozen
DEMAND = 3  # requests sent = DEMAND * limit
START_TIMEOUT = 30.0  # four interpreters starting at once on a busy 2-core machine
LOAD_TIMEOUT = 40.0  # one phase's whole load
REQUEST_TIMEOUT = 15.0
REDIS_BUDGET = 0.5  # generous: a loaded box must not fall back to memory

# Two-slot routes: the ip policy's key is tagged {ip:127.0.0.1} (slot 5384, the first master); these route
# names are tagged {r:cross} (slot 12731, the third master) and {r:split} (slot 7558, the second), so each
# request is two EVALSHAs on two nodes, and a rejection by one is refunded on the other.
SMALL, LARGE = 80, 120
QUOTA = 150  # a monthly quota, counted the same way: the window ends at most once a month

# Logged when a shared limit was not decided by Redis, or a refund was lost: none may appear here.
NOT_REDIS_EVENTS = frozenset(
    {
        "ratelimit_fallback",
        "ratelimit_refund_failed",
        "redis_breaker_open",
        "redis_breaker_trial_failed",
        "redis_breaker_closed",
    }
)


LIMITED_BY = {
    "shared-ip": "ip",
    "cross-ip": "ip",
    "cross-route": "route",
    "monthly": "route",
    "split-ip": "ip",
    "split-route": "route",
}


def gcra(key: str, burst: int) -> dict[str, Any]:
    return {"key": [key], "scope": "shared", "algorithm": "gcra", "rate": 1, "period": PERIOD, "burst": burst}


def gateway_config(redis_url: str) -> dict[str, Any]:
    return {
        "redis": {"url": redis_url},
        "rate_limit": {
            "instances": INSTANCES,  # a fallback would show burst / 4 in X-RateLimit-Limit
            "redis_budget": REDIS_BUDGET,
            "policies": {
                "shared-ip": gcra("ip", BURST),
                # /echo/cross: the route's limit is the smaller one (ip's group is refunded).
                "cross-ip": gcra("ip", LARGE),
                "cross-route": gcra("route", SMALL),
                # /echo/split: the ip limit is the smaller one (the route's group is refunded).
                "split-ip": gcra("ip", SMALL),
                "split-route": gcra("route", LARGE),
                "monthly": {"key": ["route"], "algorithm": "quota", "window": "month", "limit": QUOTA},
                # Its own key: lets each gateway open its Redis connections and load the scripts first.
                "warmup": {"key": ["ip", "route"], "rate": 1000, "burst": 1000},
            },
        },
        "routes": [
            {
                "name": "cross",
                "path": "/echo/cross",
                "auth": "none",
                "rate_limit": ["cross-ip", "cross-route"],
            },
            {
                "name": "split",
                "path": "/echo/split",
                "auth": "none",
                "rate_limit": ["split-ip", "split-route"],
            },
            {"name": "warmup", "path": "/echo/warmup", "auth": "none", "rate_limit": ["warmup"]},
            {"name": "quota", "path": "/echo/quota", "auth": "none", "rate_limit": ["monthly"]},
            {"name": "all", "prefix": "/", "auth": "none", "rate_limit": ["shared-ip"]},
        ],
    }


# --------------------------------------------------------------------------------------------- gateways


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        """The JSON lines logged so far (each record is flushed as it is written)."""
        out = []
        for line in self.stdout.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict):
                    out.append(parsed)
        return out

    def output(self) -> str:
        tail = self.stdout.read_text(errors="replace").splitlines()[-30:]
        err = self.stderr.read_text(errors="replace")[-3000:]
        return f"gateway :{self.port} stdout (tail):\n" + "\n".join(tail) + f"\nstderr:\n{err}"

    async def kill(self) -> None:
        # The group is the process we started (workers: 1, so nothing else); signalled only while unreaped,
        # so the id cannot belong to anyone else yet.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)


async def wait_healthy(session: aiohttp.ClientSession, gw: GatewayProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    url = f"http://{LOOPBACK}:{gw.admin_port}/healthz"
    for _ in range(int(START_TIMEOUT / 0.05) + 1):
        if gw.proc.returncode is not None:
            raise AssertionError(f"gateway exited with {gw.proc.returncode}\n{gw.output()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"gateway not healthy after {START_TIMEOUT}s\n{gw.output()}")


@contextlib.asynccontextmanager
async def gateways(tmp_path: Path, redis_url: str, upstream_url: str) -> AsyncIterator[list[GatewayProcess]]:
    """INSTANCES `serve` processes on one config, each on its own ports; all killed on the way out."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(redis_url)), encoding="utf-8")
    started: list[GatewayProcess] = []
    try:
        for i in range(INSTANCES):
            port, admin_port = free_ports(2)
            stdout, stderr = tmp_path / f"gw{i}.out", tmp_path / f"gw{i}.err"
            with stdout.open("wb") as out, stderr.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "serve", "--config", str(config),
                    "--listen", f"{LOOPBACK}:{port}", "--admin-listen", f"{LOOPBACK}:{admin_port}",
                    "--upstream", upstream_url,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT, start_new_session=True,
                )  # fmt: skip
            started.append(GatewayProcess(proc, port, admin_port, stdout, stderr))
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(wait_healthy(session, gw) for gw in started))
            # Startup latency (connecting to every node, SCRIPT LOAD) is not measured here: one request per
            # gateway on a key of its own, so the measured requests find Redis as a running gateway does.
            for gw in started:
                timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
                async with session.get(f"{gw.url}/echo/warmup", timeout=timeout) as resp:
                    assert resp.status == 200, gw.output()
                    assert resp.headers.get("X-RateLimit-Limit") == "1000", gw.output()
        yield started
    finally:
        for gw in started:
            await gw.kill()


# ------------------------------------------------------------------------------------------------- load


@dataclass
class Answer:
    gateway: int
    status: int
    headers: dict[str, str]
    body: bytes


async def load(gws: Sequence[GatewayProcess], path: str, total: int) -> list[Answer]:
    """CLIENTS concurrent keep-alive clients, client i on gateway i % 4, `total` requests in all."""
    answers: list[Answer] = []
    issued = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        # aiohttp silently re-sends a GET whose keep-alive connection dropped: the gateway would count a
        # request the client counts once. Each request here must be exactly one request.
        session._retry_connection = False

        async def client(i: int) -> None:
            nonlocal issued
            gw = i % len(gws)
            url = gws[gw].url + path
            while issued < total:  # bounded by the shared count
                issued += 1
                timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
                async with session.get(url, timeout=timeout) as resp:
                    body = await resp.read()
                    answers.append(Answer(gw, resp.status, dict(resp.headers), body))

        async with asyncio.timeout(LOAD_TIMEOUT):
            await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    assert len(answers) == total
    return answers


# ------------------------------------------------------------------------------------------- assertions


def evalsha_calls(ports: Sequence[int]) -> int:
    total = 0
    for port in ports:
        with redis.Redis(host=LOOPBACK, port=port) as r:
            total += int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    return total


def bucket_fill(client: redis.Redis | redis.RedisCluster, policy: str, tag: str) -> float:
    """Requests a GCRA bucket currently holds: its backlog (TAT - now) over the emission interval. Redis on
    loopback shares this machine's clock."""
    tat = client.get(f"gw:rl:{{{tag}}}:{policy}")
    return 0.0 if tat is None else (float(tat) - time.time()) / PERIOD


def assert_exact(
    answers: list[Answer], *, limit: int, blocking: str, other: tuple[str, int] | None = None
) -> None:
    """Exactly `limit` admitted (200) across all gateways, every other answer the canonical 429 naming
    `blocking` (and possibly the `other` policy, with its limit), every admission decided by the one count
    in Redis."""
    statuses = collections.Counter(a.status for a in answers)
    by_gateway = collections.Counter(a.gateway for a in answers if a.status == 200)
    summary = f"statuses {dict(statuses)}, admitted per gateway {dict(by_gateway)}"
    assert set(statuses) <= {200, 429}, summary
    assert statuses[200] == limit, summary  # +0: never more; and with 3x demand, no false rejection
    assert len(by_gateway) >= 2, f"admissions from one gateway only: not a shared count ({summary})"

    allowed_policies = {blocking} | ({other[0]} if other else set())
    # X-RateLimit-* speak for the bucket with the fewest requests left: with two slots that can be the larger
    # limit's, transiently full of consumption whose refund has not landed yet (the strict direction).
    allowed_limits = {str(limit)} | ({str(other[1])} if other else set())
    admitted = [a for a in answers if a.status == 200]
    assert {a.headers.get("X-RateLimit-Limit") for a in admitted} <= allowed_limits, (
        "X-RateLimit-Limit was not the shared limit (a fallback answers limit / instances)"
    )
    remaining = sorted(int(a.headers["X-RateLimit-Remaining"]) for a in admitted)
    if other is None:
        assert remaining == list(range(limit)), "admissions were not counted by one shared, serialised count"
    else:
        assert 0 <= remaining[0] and remaining[-1] < limit, remaining

    for a in answers:
        if a.status != 429:
            continue
        error = json.loads(a.body)["error"]
        assert (error["status"], error["reason"]) == ("RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED"), error
        details = error["details"]
        if other is None:
            assert details == [{"limited_by": LIMITED_BY[blocking], "policy": blocking}], details
        else:
            # Usually the smaller limit; the larger one too (or alone, near the boundary, when the slots saw
            # concurrent requests in different orders) while refunds are in flight.
            names = [d["policy"] for d in details]
            assert names and set(names) <= allowed_policies, details
            assert details == [{"limited_by": LIMITED_BY[name], "policy": name} for name in names], details
        retry = a.headers.get("Retry-After", "")
        assert retry.isdigit() and int(retry) >= 1, f"Retry-After {retry!r}"
        assert a.headers.get("X-RateLimit-Remaining") == "0", a.headers
        assert a.headers.get("X-RateLimit-Limit") in allowed_limits, a.headers


def assert_redis_decided(gws: Sequence[GatewayProcess]) -> None:
    for gw in gws:
        logs = gw.logs()
        bad = [
            e for e in logs if e.get("event") in NOT_REDIS_EVENTS or e.get("level") in ("error", "critical")
        ]
        assert not bad, f"a shared limit was not decided by Redis: {bad[:5]}\n{gw.output()}"
        assert gw.proc.returncode is None, gw.output()


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow  # subprocess gateways (about 2 s)
async def test_one_redis_four_gateways_admit_exactly_the_limit(tmp_path: Path) -> None:
    server = RedisProcess().start()
    try:
        async with UpstreamServer() as upstream, gateways(tmp_path, server.url, upstream.url) as gws:
            before = evalsha_calls([server.port])
            answers = await load(gws, "/echo/accuracy", DEMAND * BURST)
            assert_exact(answers, limit=BURST, blocking="shared-ip")
            assert_redis_decided(gws)
            assert evalsha_calls([server.port]) - before == DEMAND * BURST  # one EVALSHA per request
            assert sum(1 for seen in upstream.requests if seen.raw_path == "/echo/accuracy") == BURST
            with redis.Redis(host=LOOPBACK, port=server.port) as client:
                assert bucket_fill(client, "shared-ip", f"ip:{LOOPBACK}") == pytest.approx(BURST, abs=0.05)

            # A calendar quota: the same exact count, one counter per window.
            answers = await load(gws, "/echo/quota", DEMAND * QUOTA)
            assert_exact(answers, limit=QUOTA, blocking="monthly")
            assert_redis_decided(gws)
            assert sum(1 for seen in upstream.requests if seen.raw_path == "/echo/quota") == QUOTA
    finally:
        server.stop()


@pytest.mark.slow  # subprocess gateways and a cluster (about 5 s)
async def test_redis_cluster_four_gateways_admit_exactly_the_limit_on_one_and_two_slots(
    tmp_path: Path,
) -> None:
    with redis_cluster() as nodes:
        ports = [node.port for node in nodes]
        url = "redis+cluster://" + ",".join(f"{LOOPBACK}:{port}" for port in ports)
        cluster = redis.RedisCluster(host=LOOPBACK, port=ports[0])
        try:
            async with UpstreamServer() as upstream, gateways(tmp_path, url, upstream.url) as gws:
                # One slot: one EVALSHA per request, on the node that owns {ip:127.0.0.1}.
                before = evalsha_calls(ports)
                answers = await load(gws, "/echo/accuracy", DEMAND * BURST)
                assert_exact(answers, limit=BURST, blocking="shared-ip")
                assert_redis_decided(gws)
                assert evalsha_calls(ports) - before == DEMAND * BURST
                assert bucket_fill(cluster, "shared-ip", f"ip:{LOOPBACK}") == pytest.approx(BURST, abs=0.05)

                # Two slots on two nodes, either limit the smaller: admitted never exceeds either, reaches
                # the smaller exactly, and the larger bucket keeps only what was admitted (refunds landed).
                for route, small, large in (
                    ("cross", "cross-route", "cross-ip"),
                    ("split", "split-ip", "split-route"),
                ):
                    requests = DEMAND * SMALL
                    before = evalsha_calls(ports)
                    answers = await load(gws, f"/echo/{route}", requests)
                    assert_exact(answers, limit=SMALL, blocking=small, other=(large, LARGE))
                    assert_redis_decided(gws)
                    rejected = requests - SMALL
                    # Two EVALSHAs per request, plus one refund per request that only one slot rejected.
                    assert 2 * requests <= evalsha_calls(ports) - before <= 2 * requests + rejected
                    ip_tag, route_tag = f"ip:{LOOPBACK}", f"r:{route}"
                    fills = {
                        f"{route}-ip": bucket_fill(cluster, f"{route}-ip", ip_tag),
                        f"{route}-route": bucket_fill(cluster, f"{route}-route", route_tag),
                    }
                    assert fills == {
                        small: pytest.approx(SMALL, abs=0.05),
                        large: pytest.approx(SMALL, abs=0.05),
                    }, f"buckets hold {fills} after {SMALL} admissions"
                    assert sum(1 for seen in upstream.requests if seen.raw_path == f"/echo/{route}") == SMALL
        finally:
            cluster.close()


def test_the_two_slot_routes_span_different_cluster_nodes() -> None:
    """The premise of the refund test: 3 masters split 16384 slots in thirds; these tags land apart."""
    ip = key_slot(f"ip:{LOOPBACK}".encode())
    for route in ("cross", "split"):
        other = key_slot(f"r:{route}".encode())
        assert other // 5462 != ip // 5462
