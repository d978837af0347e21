"""Shared fixtures: a real misbehaving upstream and in-process gateways on loopback ports."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).parent))

import redis
from redis_server import RedisProcess
from upstream_server import UpstreamServer

from gateway.config import GatewayConfig
from gateway.server import GatewayServer

# The gateway runs on uvloop (gateway/server.py), whose transports and timers differ from asyncio's in ways
# the upstream client depends on, and whose TLS is its own: the proxy's and TLS tests run on both loops.
BOTH_LOOPS = ("test_proxy.py", "test_upstream_client.py", "test_tls.py", "test_websocket_streams.py")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    if item.path.name in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}  # one factory: the test's id stays as it was


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


@dataclass
class RunningGateway:
    server: GatewayServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.address[1]}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_address[1]}"

    @property
    def port(self) -> int:
        return self.server.address[1]


MakeGateway = Callable[..., Awaitable[RunningGateway]]

CATCH_ALL = [{"name": "all", "prefix": "/", "websocket": True, "auth": "none"}]
HEALTHY_REDIS_BUDGET = 2.0


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as up:
        yield up


@pytest.fixture
async def make_gateway() -> AsyncIterator[MakeGateway]:
    """make_gateway(upstream_url, **config) → a started in-process gateway; every route goes to the upstream
    unless `routes` is given."""
    started: list[GatewayServer] = []

    async def factory(upstream_url: str, **config: Any) -> RunningGateway:
        raw = deep_merge(
            {
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "upstream": {"url": upstream_url},
                "routes": CATCH_ALL,
                # A busy CI box can take longer than the default 50 ms for one healthy Redis round trip; a
                # test that is about the budget sets its own.
                "rate_limit": {"redis_budget": HEALTHY_REDIS_BUDGET},
            },
            config,
        )
        server = GatewayServer(GatewayConfig.model_validate(raw))
        started.append(server)
        await server.start()
        return RunningGateway(server)

    yield factory
    for server in reversed(started):
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no decompression, no cookies kept, so tests see exactly what the gateway sent."""
    async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisProcess]:
    """One real redis-server for the session; tests that kill or pause Redis start their own."""
    proc = RedisProcess().start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_process: RedisProcess) -> str:
    """The session's Redis, emptied for this test."""
    client = redis.Redis(host="127.0.0.1", port=redis_process.port)
    client.flushall()
    client.close()
    return redis_process.url
