"""The admin listener's /healthz and /readyz."""

from __future__ import annotations

import asyncio

from upstream_server import refused_url


async def test_healthz_is_ok(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url)
    async with client.get(f"{gw.admin_url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def _ready(client, gw, want: int) -> dict:
    for _ in range(200):  # the first probe runs as the gateway starts
        async with client.get(f"{gw.admin_url}/readyz") as resp:
            if resp.status == want:
                return await resp.json()
        await asyncio.sleep(0.01)
    raise AssertionError(f"/readyz never answered {want}")


async def test_ready_once_the_upstream_answers(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url)
    body = await _ready(client, gw, 200)
    assert body["checks"] == {"config": "ok", "upstream": "ok"}


async def test_not_ready_while_the_upstream_is_unreachable(make_gateway, client):
    url = await refused_url()
    gw = await make_gateway(url, health={"upstream_probe_interval": 0.05, "upstream_max_age": 0.1})
    body = await _ready(client, gw, 503)
    assert body["status"] == "not_ready"
    assert url in body["checks"]["upstream"]


async def test_not_ready_while_draining(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url)
    await _ready(client, gw, 200)
    gw.server.gateway.admission.draining = True
    body = await _ready(client, gw, 503)
    assert body["checks"]["server"] == "draining"
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["reason"] == "SERVICE_UNAVAILABLE"


async def test_readiness_reports_redis_when_limits_are_shared(upstream, make_gateway, client, redis_url):
    gw = await make_gateway(upstream.url, redis={"url": redis_url})
    body = await _ready(client, gw, 200)
    assert body["checks"]["redis"] == "ok"
    plain = await make_gateway(upstream.url)
    assert "redis" not in (await _ready(client, plain, 200))["checks"]
