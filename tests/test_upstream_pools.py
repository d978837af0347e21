"""Upstream pools end to end: in-process gateways balancing over real upstreams on loopback (and refused
ports), their passive health, /readyz, metrics and logs; plus the configuration and readiness rules."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from upstream_server import UpstreamServer, refused_url

from gateway import logs
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.health import RouteTargets, routes_without_target, upstream_check
from gateway.proxy.client import LocalConnectFailed, PoolWaitTimeout
from gateway.proxy.targets import TargetPool, Tries
from gateway.routing import compile_routes

# --- helpers ------------------------------------------------------------------------------------------------


def pool_gateway(
    *urls: str | tuple[str, int],
    name: str,
    balance: str = "round_robin",
    retries: int = 1,
    **passive_health: Any,
) -> dict[str, Any]:
    """make_gateway settings: one pool of these targets (URL, or (URL, weight)) behind a catch-all route."""
    targets = [{"url": u} if isinstance(u, str) else {"url": u[0], "weight": u[1]} for u in urls]
    pool: dict[str, Any] = {"targets": targets, "balance": balance}
    if passive_health:
        pool["passive_health"] = passive_health
    return {
        "upstream": {"retries": retries},
        "upstream_pools": {name: pool},
        "routes": [{"name": f"{name}-route", "prefix": "/", "pool": name, "auth": "none", "websocket": True}],
    }


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for n, found, v in samples(text) if n == name and labels.items() <= found.items())


async def scrape(client: aiohttp.ClientSession, gw: Any) -> str:
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any] | None, str]:
    async with client.get(url) as resp:
        body = await resp.read()
        data = json.loads(body) if resp.content_type == "application/json" else None
        return resp.status, data, resp.headers.get("X-Request-ID", "")


async def eventually(condition: Callable[[], Any], what: str) -> None:
    """Poll, for at most 5 s, a state the test cannot await."""
    for _ in range(500):
        if await condition() if asyncio.iscoroutinefunction(condition) else condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def readyz(client: aiohttp.ClientSession, gw: Any) -> tuple[int, dict[str, Any]]:
    async with client.get(f"{gw.admin_url}/readyz") as resp:
        return resp.status, await resp.json()


async def ready_as(client: aiohttp.ClientSession, gw: Any, check: Callable[[int, dict[str, Any]], bool]):
    """/readyz once it satisfies `check` (the first probes run as the gateway starts)."""
    found: list[tuple[int, dict[str, Any]]] = []

    async def holds() -> bool:
        found.append(await readyz(client, gw))
        return check(*found[-1])

    await eventually(holds, f"/readyz as expected; last {found[-1:]}")
    return found[-1]


class AccessLog:
    """The access-log lines written to the captured stdout, read as they come."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self.lines: list[dict[str, Any]] = []
        capsys.readouterr()

    async def line(self, request_id: str) -> dict[str, Any]:
        """The line of one request: written once its response is done, which may trail the client a bit."""

        def read() -> bool:
            logs.flush_access_log()
            out = self._capsys.readouterr().out
            self.lines += [json.loads(x) for x in out.splitlines() if '"event":"request"' in x]
            return any(entry["request_id"] == request_id for entry in self.lines)

        await eventually(read, f"an access-log line for {request_id}")
        return next(entry for entry in self.lines if entry["request_id"] == request_id)


class PortListener:
    """A bare TCP listener on a chosen port (a target that was refusing until now): counts connections,
    and those on which a request arrived (a TCP probe connects and closes without sending a byte)."""

    def __init__(self, url: str) -> None:
        self.port = int(url.rsplit(":", 1)[1])
        self.connections = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if await reader.read(1):
                self.requests += 1
        finally:
            writer.close()


@pytest.fixture
async def second() -> Any:
    async with UpstreamServer() as up:
        yield up


@pytest.fixture
async def third() -> Any:
    async with UpstreamServer() as up:
        yield up


# --- balancing ----------------------------------------------------------------------------------------------


async def test_weighted_round_robin_shares_requests_exactly_by_weight(upstream, second, make_gateway, client):
    gw = await make_gateway(upstream.url, **pool_gateway((upstream.url, 3), (second.url, 1), name="wrr"))
    for _ in range(40):
        status, _, _ = await get(client, f"{gw.url}/echo/x")
        assert status == 200
    assert (len(upstream.requests), len(second.requests)) == (30, 10)
    # Each target is its own origin: the Host it receives is its own.
    assert upstream.last.header("Host") == upstream.host_header
    assert second.last.header("Host") == second.host_header
    text = await scrape(client, gw)
    sent = "gateway_upstream_target_requests_total"
    assert value(text, sent, pool="wrr", target=upstream.url) == 30
    assert value(text, sent, pool="wrr", target=second.url) == 10


async def test_least_request_sends_requests_to_the_idle_target(upstream, second, make_gateway, client):
    gw = await make_gateway(
        upstream.url, **pool_gateway(upstream.url, second.url, name="lr", balance="least_request")
    )
    held = asyncio.create_task(get(client, f"{gw.url}/hang"))  # stays in flight on the target it reached
    await eventually(lambda: any(up.requests for up in (upstream, second)), "the held request arrived")
    busy, idle = (upstream, second) if upstream.requests else (second, upstream)
    for _ in range(6):
        status, _, _ = await get(client, f"{gw.url}/echo/x")
        assert status == 200
    assert [s.raw_path for s in busy.requests] == ["/hang"]
    assert [s.raw_path for s in idle.requests] == ["/echo/x"] * 6

    held.cancel()  # the client gives up: the gateway's request ends, and with it the busy target's count
    with pytest.raises(asyncio.CancelledError):
        await held

    async def busy_gets_one_again() -> bool:
        status, _, _ = await get(client, f"{gw.url}/echo/again")
        assert status == 200
        return any(s.raw_path == "/echo/again" for s in busy.requests)

    await eventually(busy_gets_one_again, "the formerly busy target takes requests again")


# --- passive health -----------------------------------------------------------------------------------------


async def test_a_refused_target_is_ejected_and_idempotent_requests_never_fail(
    upstream, second, make_gateway, client, capsys
):
    refused = await refused_url()
    # Weighted so that a retry that could go back to the refused target would (as its next turn).
    gw = await make_gateway(
        upstream.url, **pool_gateway((refused, 2), upstream.url, second.url, name="ej", failures=3)
    )
    access = AccessLog(capsys)
    with capture_logs() as events:
        for _ in range(30):
            status, _, rid = await get(client, f"{gw.url}/echo/x")
            assert status == 200  # a refused attempt was retried on another target
            assert (await access.line(rid))["upstream_target"] in (upstream.url, second.url)
    assert len(upstream.requests) + len(second.requests) == 30
    text = await scrape(client, gw)
    assert value(text, "gateway_upstream_target_requests_total", pool="ej", target=refused) == 3
    assert (
        value(text, "gateway_upstream_target_failures_total", pool="ej", target=refused, kind="connect") == 3
    )
    assert value(text, "gateway_upstream_target_ejections_total", pool="ej", target=refused) == 1
    assert value(text, "gateway_upstream_target_ejected", pool="ej", target=refused) == 1
    assert value(text, "gateway_upstream_target_ejected", pool="ej", target=upstream.url) == 0
    retries = [e for e in events if e["event"] == "upstream_retry"]
    assert len(retries) == 3 and {e["upstream_target"] for e in retries} == {refused}
    [ejected] = [e for e in events if e["event"] == "upstream_target_ejected"]
    assert (ejected["pool"], ejected["upstream_target"], ejected["kind"]) == ("ej", refused, "connect")
    assert ejected["seconds"] == 30.0 and ejected["log_level"] == "warning"

    _, body = await ready_as(client, gw, lambda status, body: "ejected" in body["checks"]["upstream"])
    assert body["status"] == "degraded" and f"ejected from pool ej: {refused}" in body["checks"]["upstream"]


async def test_a_non_idempotent_request_is_not_retried_on_another_target(upstream, make_gateway, client):
    refused = await refused_url()
    gw = await make_gateway(upstream.url, **pool_gateway(refused, upstream.url, name="post"))
    async with client.post(f"{gw.url}/sink", data=b"x") as resp:  # the first pick is the refused target
        assert resp.status == 502
        assert (await resp.json())["error"]["reason"] == "UPSTREAM_UNAVAILABLE"
    assert upstream.requests == []


async def test_every_target_ejected_is_a_503_without_a_connection_attempt(make_gateway, client, capsys):
    first, other = await refused_url(), await refused_url()
    gw = await make_gateway(
        first,
        health={"upstream_probe_interval": 3600},  # probed once at start, then never: only requests connect
        **pool_gateway(first, other, name="dead", retries=0, failures=1, ejection=30),
    )
    for _ in range(2):  # each target fails once: both out
        status, data, _ = await get(client, f"{gw.url}/echo/x")
        assert status == 502 and data is not None
    access = AccessLog(capsys)
    async with PortListener(first) as back1, PortListener(other) as back2:  # they would answer now
        async with client.get(f"{gw.url}/echo/x") as resp:
            assert resp.status == 503
            error = (await resp.json())["error"]
            retry_after = int(resp.headers["Retry-After"])
            rid = resp.headers["X-Request-ID"]
        assert (back1.connections, back2.connections) == (0, 0)
    assert (error["status"], error["reason"], error["request_id"]) == (
        "UNAVAILABLE",
        "SERVICE_UNAVAILABLE",
        rid,
    )
    assert "Retry later" in error["message"] and "127.0.0.1" not in error["message"]
    assert 1 <= retry_after <= 30
    line = await access.line(rid)
    assert (line["status"], line["upstream_error"], line["upstream_target"]) == (503, "ejected", None)
    text = await scrape(client, gw)
    assert value(text, "gateway_upstream_errors_total", route="dead-route", kind="ejected") == 1
    assert value(text, "gateway_upstream_target_requests_total", pool="dead") == 2

    status, body = await ready_as(client, gw, lambda status, body: status == 503)
    assert (
        body["status"] == "not_ready" and body["checks"]["routes"] == "no usable upstream target: dead-route"
    )


async def test_an_ejected_target_returns_when_its_ejection_ends(upstream, make_gateway, client):
    refused = await refused_url()
    gw = await make_gateway(
        upstream.url, **pool_gateway(refused, upstream.url, name="back", failures=1, ejection=0.05)
    )
    sent = "gateway_upstream_target_requests_total"
    with capture_logs() as events:
        status, _, _ = await get(client, f"{gw.url}/echo/x")  # refused, retried on the other target
        assert status == 200

        async def back_in() -> bool:  # with no traffic: the ejection's end shows by itself
            text = await scrape(client, gw)
            return value(text, "gateway_upstream_target_ejected", pool="back", target=refused) == 0

        await eventually(back_in, "the gauge shows the target back")
        returned = [e for e in events if e["event"] == "upstream_target_returned"]
        assert [e["upstream_target"] for e in returned] == [refused]

        async def tried_again() -> bool:
            status, _, _ = await get(client, f"{gw.url}/echo/x")
            assert status == 200
            return value(await scrape(client, gw), sent, pool="back", target=refused) >= 2

        await eventually(tried_again, "the target was tried again")
    ejections = [e["seconds"] for e in events if e["event"] == "upstream_target_ejected"]
    assert ejections == [0.05, 0.1]  # back once, failed once: out for twice as long


async def test_an_ejected_target_whose_probe_succeeds_stays_out_until_its_ejection_ends(
    upstream, make_gateway, client
):
    refused = await refused_url()
    gw = await make_gateway(
        upstream.url,
        health={"upstream_probe_interval": 0.05, "upstream_max_age": 30},
        **pool_gateway(refused, upstream.url, name="probed", failures=1),
    )
    status, _, _ = await get(client, f"{gw.url}/echo/x")  # the refused target's one failure ejects it
    assert status == 200
    async with PortListener(refused) as back:
        _, body = await ready_as(
            client, gw, lambda status, body: "unreachable" not in body["checks"]["upstream"]
        )
        assert back.connections >= 1  # the probe reached it...
        assert body["checks"]["upstream"] == f"ejected from pool probed: {refused}"  # ...and it stays out
        assert body["status"] == "degraded"
        for _ in range(6):
            status, _, _ = await get(client, f"{gw.url}/echo/x")
            assert status == 200
        assert back.requests == 0
    assert len(upstream.requests) == 7


async def test_a_pool_of_one_target_is_never_ejected(make_gateway, client):
    refused = await refused_url()
    gw = await make_gateway(refused, **pool_gateway(refused, name="solo", retries=0, failures=1))
    for _ in range(4):
        status, data, _ = await get(client, f"{gw.url}/echo/x")
        assert status == 502 and data is not None and data["error"]["reason"] == "UPSTREAM_UNAVAILABLE"
    text = await scrape(client, gw)
    assert value(text, "gateway_upstream_target_requests_total", pool="solo", target=refused) == 4
    assert value(text, "gateway_upstream_target_ejections_total", pool="solo", target=refused) == 0


# --- readiness ----------------------------------------------------------------------------------------------


async def test_readyz_lists_unreachable_targets_and_is_degraded_while_each_route_has_one(
    upstream, make_gateway, client
):
    refused = await refused_url()
    gw = await make_gateway(
        upstream.url,
        health={"upstream_probe_interval": 0.05, "upstream_max_age": 30},
        **pool_gateway(upstream.url, refused, name="half"),
    )
    _, body = await ready_as(client, gw, lambda status, body: status == 200)
    assert body == {"status": "degraded", "checks": {"config": "ok", "upstream": f"unreachable: {refused}"}}


async def test_not_ready_when_a_route_has_no_usable_target(upstream, make_gateway, client):
    dead = [await refused_url(), await refused_url()]
    gw = await make_gateway(
        upstream.url,
        health={"upstream_probe_interval": 0.05, "upstream_max_age": 30},
        upstream_pools={
            "gone": {"targets": [{"url": u} for u in dead]},
            "fine": {"targets": [{"url": upstream.url}]},
        },
        routes=[
            {"name": "r-gone", "prefix": "/gone", "pool": "gone", "auth": "none"},
            {"name": "r-fine", "prefix": "/", "pool": "fine", "auth": "none"},
        ],
    )
    # Until its first probe, the fine route's upstream is unreachable too.
    wanted = "no usable upstream target: r-gone"
    status, body = await ready_as(client, gw, lambda status, body: body["checks"].get("routes") == wanted)
    assert status == 503 and body["status"] == "not_ready"
    assert body["checks"]["upstream"] == f"unreachable: {dead[0]}, {dead[1]}"


def test_which_routes_are_left_without_a_target() -> None:
    routes = {
        "plain": RouteTargets(None, ("http://a",)),
        "pooled": RouteTargets("p", ("http://a", "http://b")),
        "other": RouteTargets("q", ("http://b",)),
    }
    assert routes_without_target(routes, [], {}) == []
    assert routes_without_target(routes, ["http://a"], {}) == ["plain"]
    assert routes_without_target(routes, ["http://a"], {"p": ["http://b"]}) == ["plain", "pooled"]
    # An ejection is from one pool only: the same URL in another pool still serves.
    assert routes_without_target(routes, [], {"p": ["http://b"]}) == []
    assert upstream_check([], {}) == "ok"
    assert upstream_check(["http://a"], {"p": ["http://b"], "q": []}) == (
        "unreachable: http://a; ejected from pool p: http://b"
    )


# --- WebSocket ----------------------------------------------------------------------------------------------


async def test_websockets_pick_targets_too_and_count_as_in_flight(upstream, second, make_gateway, client):
    # By weight both would go to the first target; the first stream in flight there sends the second away.
    gw = await make_gateway(
        upstream.url,
        **pool_gateway((upstream.url, 3), second.url, name="ws-lr", balance="least_request"),
    )
    async with client.ws_connect(f"{gw.url}/ws") as one, client.ws_connect(f"{gw.url}/ws") as two:
        for ws in (one, two):
            await ws.send_str("hello")
            assert (await ws.receive_str()) == "hello"
        assert upstream.ws_headers and second.ws_headers


async def test_a_websocket_handshake_refused_by_one_target_is_retried_on_another(
    upstream, make_gateway, client
):
    refused = await refused_url()
    gw = await make_gateway(upstream.url, **pool_gateway(refused, upstream.url, name="ws-retry"))
    async with client.ws_connect(f"{gw.url}/ws") as ws:  # the first pick is the refused target
        await ws.send_str("hi")
        assert (await ws.receive_str()) == "hi"
    text = await scrape(client, gw)
    assert value(text, "gateway_upstream_target_failures_total", pool="ws-retry", target=refused) == 1


# --- routes with one upstream -------------------------------------------------------------------------------


async def test_a_route_with_one_upstream_logs_it_as_the_target(upstream, make_gateway, client, capsys):
    gw = await make_gateway(upstream.url)
    access = AccessLog(capsys)
    status, _, rid = await get(client, f"{gw.url}/echo/x")
    assert status == 200
    assert (await access.line(rid))["upstream_target"] == upstream.url


async def test_upstream_failure_logs_name_the_target_of_a_single_upstream(make_gateway, client):
    refused = await refused_url()
    gw = await make_gateway(refused)
    with capture_logs() as events:
        status, _, _ = await get(client, f"{gw.url}/echo/x")
    assert status == 502
    [failed] = [e for e in events if e["event"] == "upstream_failed"]
    [retry] = [e for e in events if e["event"] == "upstream_retry"]
    assert failed["upstream_target"] == retry["upstream_target"] == refused


# --- the pool's bookkeeping (no sockets) --------------------------------------------------------------------


async def test_resets_and_protocol_errors_do_not_count_towards_an_ejection() -> None:
    config = GatewayConfig.model_validate(
        {"upstream_pools": {"kinds": {"targets": [{"url": "http://10.0.0.1"}, {"url": "http://10.0.0.2"}]}}}
    )
    pool = TargetPool("kinds", config.upstream_pools["kinds"])
    target = pool.balancer.targets[0]
    for _ in range(5):
        pool.failed(target, "reset", target.epoch)
        pool.failed(target, "protocol", target.epoch)
    assert not pool.balancer.is_ejected(target)
    for _ in range(3):
        pool.failed(target, "timeout", target.epoch)
    assert pool.balancer.is_ejected(target)
    await pool.close()


async def test_an_ejection_renewed_before_the_loops_timer_ran_leaves_one_timer() -> None:
    """The balancer's clock may end an ejection before the loop's timer for it runs; a failure in between
    ejects the target again, and the earlier timer must not then end the new ejection's bookkeeping."""
    now = [0.0]
    health = {"failures": 1, "ejection": 30.0, "max_ejection": 300.0}
    targets = [{"url": "http://10.0.0.1"}, {"url": "http://10.0.0.2"}]
    config = GatewayConfig.model_validate(
        {"upstream_pools": {"renew": {"targets": targets, "passive_health": health}}}
    )
    pool = TargetPool("renew", config.upstream_pools["renew"], clock=lambda: now[0])
    target = pool.balancer.targets[0]
    pool.failed(target, "connect", target.epoch)
    first = pool._returns[target]
    now[0] = 30.0  # back by the clock, its timer not run yet
    pool.failed(target, "connect", target.epoch)
    assert first.cancelled() and not pool._returns[target].cancelled()
    await pool.close()
    assert pool._returns == {}


# --- the gateway's own limits, timeouts before sending, stale attempts --------------------------------------


def ejected(gw: Any, pool: str) -> list[str]:
    return [t.url for t in gw.server.gateway.targets.pools[pool].balancer.ejected()]


class Blackhole:
    """A port whose listener never accepts and whose accept queue is full: the kernel drops further SYNs,
    so a connection attempt hangs until its timeout (a target behind a firewall that drops packets)."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)  # Linux: a queue of one
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._filler = socket.create_connection(self._listener.getsockname(), timeout=5)  # fills it

    def close(self) -> None:
        self._filler.close()
        self._listener.close()


@pytest.fixture
def blackhole() -> Any:
    hole = Blackhole()
    yield hole
    hole.close()


async def test_waiting_for_the_gateways_own_connection_pool_does_not_count_against_targets(
    upstream, second, make_gateway, client
):
    cfg = pool_gateway(upstream.url, second.url, name="full", failures=1)
    cfg["upstream"].update({"pool": {"max_connections": 1}, "timeouts": {"connect": 0.3}})
    gw = await make_gateway(upstream.url, **cfg)
    held = asyncio.create_task(get(client, f"{gw.url}/hang"))  # takes the gateway's only connection
    await eventually(lambda: upstream.requests or second.requests, "the held request arrived")
    statuses = [(await get(client, f"{gw.url}/echo/x"))[0] for _ in range(2)]
    assert statuses == [504, 504]  # answered as before: a timeout
    assert ejected(gw, "full") == []
    text = await scrape(client, gw)
    assert value(text, "gateway_upstream_target_failures_total", pool="full") == 0
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    found: list[int] = []

    async def served() -> bool:
        found.append((await get(client, f"{gw.url}/echo/x"))[0])
        return found[-1] == 200

    await eventually(served, "a request served once the connection is free")
    assert set(found) <= {200, 504}  # never 503: no target was ejected


async def test_a_full_websocket_pool_does_not_count_against_targets(upstream, second, make_gateway, client):
    cfg = pool_gateway(upstream.url, second.url, name="slots", failures=1)
    cfg["upstream"].update({"pool": {"max_websockets": 1}})
    gw = await make_gateway(upstream.url, **cfg)
    async with client.ws_connect(f"{gw.url}/ws") as first:
        await first.send_str("hi")
        assert await first.receive_str() == "hi"
        for _ in range(2):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with client.ws_connect(f"{gw.url}/ws"):
                    pass
            assert refused.value.status == 503
        assert ejected(gw, "slots") == []
        assert (await get(client, f"{gw.url}/echo/x"))[0] == 200
    text = await scrape(client, gw)
    assert value(text, "gateway_upstream_target_failures_total", pool="slots") == 0


async def test_a_connect_timeout_is_retried_on_another_target(upstream, blackhole, make_gateway, client):
    cfg = pool_gateway(blackhole.url, upstream.url, name="hole", retries=1)
    cfg["upstream"]["timeouts"] = {"connect": 0.3}
    gw = await make_gateway(upstream.url, health={"upstream_probe_interval": 3600}, **cfg)
    status, data, _ = await get(client, f"{gw.url}/echo/x")  # the first pick is the blackholed target
    assert status == 200 and data is not None and len(upstream.requests) == 1
    text = await scrape(client, gw)
    assert value(text, "gateway_upstream_target_failures_total", target=blackhole.url, kind="timeout") == 1
    async with client.post(f"{gw.url}/sink", data=b"x") as resp:  # a POST is never sent twice
        statuses = [resp.status]
    async with client.post(f"{gw.url}/sink", data=b"x") as resp:
        statuses.append(resp.status)
    assert sorted(statuses) == [200, 504]  # one to each target, by turn


async def test_a_failure_picked_before_an_ejection_does_not_eject_the_target_after_it() -> None:
    now = [0.0]
    health = {"failures": 1, "ejection": 30.0, "max_ejection": 300.0}
    targets = [{"url": "http://10.0.0.1", "weight": 2}, {"url": "http://10.0.0.2"}]
    config = GatewayConfig.model_validate(
        {"upstream_pools": {"stale": {"targets": targets, "passive_health": health}}}
    )
    pool = TargetPool("stale", config.upstream_pools["stale"], clock=lambda: now[0])
    a = pool.balancer.targets[0]
    early, other, late = Tries(pool), Tries(pool), Tries(pool)
    assert (early.next(), other.next(), late.next()) == (a.url, "http://10.0.0.2", a.url)  # weights 2:1
    early.failed(TimeoutError())  # t=0: a out for 30 s
    assert pool.balancer.is_ejected(a)
    now[0] = 45.0  # back since t=30; the other request sent to it at t=0 times out only now
    late.failed(TimeoutError())
    assert not pool.balancer.is_ejected(a) and a.ejections == 1
    again = Tries(pool)
    assert again.next() == a.url
    again.failed(TimeoutError())  # a request sent after the ejection: out again, for twice as long
    assert a.ejected_until == 45.0 + 60.0
    await pool.close()


async def test_the_gateways_own_limits_are_no_targets_failure() -> None:
    targets = [{"url": "http://10.0.0.1"}, {"url": "http://10.0.0.2"}]
    own = {"targets": targets, "passive_health": {"failures": 1}}
    config = GatewayConfig.model_validate({"upstream_pools": {"own": own}})
    pool = TargetPool("own", config.upstream_pools["own"])
    for error in (PoolWaitTimeout("full"), LocalConnectFailed("EMFILE")):
        tries = Tries(pool)
        tries.next()
        tries.failed(error)
    assert pool.balancer.ejected() == [] and all(t.in_flight == 0 for t in pool.balancer.targets)
    await pool.close()


def ejected_gauge(pool: str, target: str) -> float | None:
    return REGISTRY.get_sample_value("gateway_upstream_target_ejected", {"pool": pool, "target": target})


async def test_only_the_pool_built_last_writes_a_targets_ejected_gauge() -> None:
    """A reload that rebuilds a pool keeps the old one alive while its event streams last: its timers and
    close() must not write the new pool's series."""
    now = [0.0]
    targets = [{"url": "http://10.0.0.1"}, {"url": "http://10.0.0.2"}]
    old_config = GatewayConfig.model_validate(
        {"upstream_pools": {"gen": {"targets": targets, "passive_health": {"failures": 1, "ejection": 1.0}}}}
    )
    new_config = GatewayConfig.model_validate(
        {"upstream_pools": {"gen": {"targets": targets, "passive_health": {"failures": 1, "ejection": 20.0}}}}
    )
    url = "http://10.0.0.1"
    old = TargetPool("gen", old_config.upstream_pools["gen"], clock=lambda: now[0])
    old.failed(old.balancer.targets[0], "connect", 0)
    assert ejected_gauge("gen", url) == 1
    new = TargetPool("gen", new_config.upstream_pools["gen"], clock=lambda: now[0])
    assert ejected_gauge("gen", url) == 0  # a pool built afresh: nothing of it is ejected yet
    new.failed(new.balancer.targets[0], "connect", 0)
    assert ejected_gauge("gen", url) == 1
    now[0] = 1.0
    old._returned(old.balancer.targets[0])  # the old pool's timer: its ejection is over, not the new one's
    await old.close()
    assert ejected_gauge("gen", url) == 1
    await new.close()
    assert ejected_gauge("gen", url) == 0


# --- configuration ------------------------------------------------------------------------------------------


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gw.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    return str(info.value)


POOLS = """
upstream_pools:
  api: {targets: [{url: "http://10.0.0.5:8000", weight: 2}, {url: "http://10.0.0.6:8000"}]}
  web: {targets: [{url: "http://10.0.0.7:8000"}], balance: least_request}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            POOLS + "routes: [{name: a, prefix: /, pool: apj}]",
            "routes[0].pool = 'apj': unknown pool 'apj'; defined: api, web",
        ),
        (
            POOLS + "routes: [{name: a, prefix: /, pool: api, upstream: 'http://x'}]",
            "routes[0].pool = 'api': a route takes its targets from 'pool' or 'upstream', not both",
        ),
        (
            POOLS + "upstream: {pool_name: default}",
            "upstream.pool_name = 'default': unknown pool 'default'; defined: api, web",
        ),
        (
            "upstream: {pool_name: api}",
            "upstream.pool_name = 'api': unknown pool 'api'; defined: none (define it under upstream_pools)",
        ),
        (
            "upstream_pools: {api: {targets: []}}",
            "upstream_pools.api.targets = []: Value error, a pool needs at least one target",
        ),
        (
            "upstream_pools: {api: {targets: [{url: 'http://a:1'}, {url: 'http://a:1/'}]}}",
            "'http://a:1' is listed twice",
        ),
        (
            "upstream_pools: {api: {targets: [{url: 'http://h.example'}, {url: 'http://H.example:80/'}]}}",
            "upstream_pools.api.targets = [{'url': 'http://h.example'}, {'url': 'http://H.example:80/'}]: "
            "Value error, 'http://H.example:80' is listed twice (as 'http://h.example': the same scheme",
        ),
        (
            "upstream_pools: {api: {targets: [{url: 'http://a:1', weight: 0}]}}",
            "upstream_pools.api.targets[0].weight = 0: Input should be greater than 0",
        ),
        (
            "upstream_pools: {api: {targets: [{url: 'ftp://a'}]}}",
            "upstream_pools.api.targets[0].url = 'ftp://a': Value error, must be an http:// or https:// URL",
        ),
        (
            "upstream_pools: {api: {targets: [{url: 'http://a:1'}], balance: random}}",
            "upstream_pools.api.balance = 'random': Input should be 'round_robin' or 'least_request'",
        ),
        (
            "upstream_pools: {api: {targets: [{url: 'http://a:1'}],"
            " passive_health: {ejection: 60, max_ejection: 10}}}",
            "upstream_pools.api.passive_health: Value error, "
            "max_ejection (10) must be at least ejection (60)",
        ),
        (
            "upstream_pools: {api: {targets: [{url: 'http://a:1'}], passive_health: {failures: 0}}}",
            "upstream_pools.api.passive_health.failures = 0: Input should be greater than 0",
        ),
        (
            "upstream_pools: {API: {targets: [{url: 'http://a:1'}]}}",
            "String should match pattern",
        ),
        (
            "upstream_pools: {api: {targets: [{url: 'http://a:1'}], sticky: true}}",
            "upstream_pools.api.sticky = True: unknown key; allowed here: balance, passive_health, targets",
        ),
    ],
)
def test_config_errors_name_the_key_the_value_and_what_is_allowed(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert expected in config_error(tmp_path, text)


def test_a_target_url_with_credentials_is_refused_without_showing_them(tmp_path: Path) -> None:
    message = config_error(tmp_path, "upstream_pools: {api: {targets: [{url: 'http://user:hunter2@a:1'}]}}")
    assert "must not carry credentials" in message and "hunter2" not in message


def test_routes_take_the_default_pool_unless_they_name_an_upstream_or_a_pool(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        POOLS
        + """
upstream: {url: "http://plain:1", pool_name: api}
routes:
  - {name: default, prefix: /d}
  - {name: own-pool, prefix: /w, pool: web}
  - {name: own-url, prefix: /u, upstream: "http://own:2"}
""",
        encoding="utf-8",
    )
    routes = {r.name: r for r in compile_routes(load_config(path, environ={}))}
    assert (routes["default"].pool, routes["own-pool"].pool, routes["own-url"].pool) == ("api", "web", None)
    assert routes["own-url"].upstream == "http://own:2" and routes["default"].upstream == ""
    without = compile_routes(GatewayConfig.model_validate({"upstream": {"url": "http://plain:1"}}))
    assert {(r.pool, r.upstream) for r in without} == {(None, "http://plain:1")}


def test_pools_from_the_environment() -> None:
    config = load_config(
        None,
        environ={
            "GATEWAY_UPSTREAM_POOLS": '{"api": {"targets": [{"url": "http://10.0.0.5:8000", "weight": 3}]}}',
            "GATEWAY_UPSTREAM_POOL_NAME": "api",
        },
    )
    assert config.upstream.pool_name == "api"
    assert [(t.url, t.weight) for t in config.upstream_pools["api"].targets] == [("http://10.0.0.5:8000", 3)]
