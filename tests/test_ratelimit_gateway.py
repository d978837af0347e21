"""Rate limits as a client sees them through the gateway: headers on every response of a limited route,
429s in the envelope, per-credential-type buckets, plans, cost, shadow, and counts shared through Redis."""

from __future__ import annotations

import math
import time
from typing import Any
from zoneinfo import ZoneInfo

import jwt
import pytest
import redis.asyncio
from aiohttp import web
from conftest import MakeGateway, RunningGateway
from structlog.testing import capture_logs
from upstream_server import refused_url

from gateway.config import GatewayConfig
from gateway.ratelimit.policies import calendar_window, team_override_key
from gateway.ratelimit.redis_backend import CHECK
from gateway.routing import compile_routes

SECRET = "ratelimit-tests-secret-of-32-bytes-or-more"
FROZEN = {"rate": 1, "period": 3600}  # no refill within a test: counts are exact


def token(**claims: Any) -> str:
    return jwt.encode({"type": "agent", "customer_id": "c1", "exp": 4102444800, **claims}, SECRET, "HS256")


def bearer(**claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(**claims)}"}


def config(policies: dict[str, Any], route: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "auth": {
            "jwt": {"keys": [{"algorithms": ["HS256"], "secret_env": "RL_TEST_SECRET"}]},
            "introspect": {"jwt": False},
            "access_keys": {"stores": []},
        },
        "rate_limit": {"policies": policies, **extra},
        "routes": [{"name": "limited", "prefix": "/", **route}],
    }


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv("RL_TEST_SECRET", SECRET)


async def statuses(client, gw: RunningGateway, n: int, headers: dict[str, str] | None = None) -> list[int]:
    out = []
    for _ in range(n):
        async with client.get(f"{gw.url}/echo/x", headers=headers or {}) as resp:
            await resp.read()
            out.append(resp.status)
    return out


async def test_headers_count_down_then_429_in_the_envelope(upstream, make_gateway: MakeGateway, client):
    gw = await make_gateway(
        upstream.url,
        **config(
            {"per-ip": {"key": ["ip"], "burst": 3, **FROZEN}}, {"auth": "none", "rate_limit": ["per-ip"]}
        ),
    )
    for expected_remaining in (2, 1, 0):
        async with client.get(f"{gw.url}/echo/x") as resp:
            assert resp.status == 200
            assert resp.headers["X-RateLimit-Limit"] == "3"
            assert resp.headers["X-RateLimit-Remaining"] == str(expected_remaining)
            reset = int(resp.headers["X-RateLimit-Reset"])
            assert time.time() < reset <= math.ceil(time.time() + 3 * 3600) + 1
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 429
        body = await resp.json()
        retry_after = int(resp.headers["Retry-After"])
        assert resp.headers["X-RateLimit-Remaining"] == "0"
    # one token every hour: the next request passes in exactly an hour, never earlier
    assert 3599 <= retry_after <= 3601
    error = body["error"]
    assert (error["status"], error["reason"]) == ("RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED")
    assert error["details"] == [{"limited_by": "ip", "policy": "per-ip"}]
    assert len(upstream.requests) == 3


async def test_customer_policy_does_not_apply_to_anonymous_requests(upstream, make_gateway, client):
    gw = await make_gateway(
        upstream.url,
        **config(
            {"cust": {"key": ["customer"], "burst": 1, **FROZEN}},
            {"auth": "optional", "rate_limit": ["cust"]},
        ),
    )
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 200
        assert "X-RateLimit-Limit" not in resp.headers
    assert await statuses(client, gw, 2, bearer()) == [200, 429]


async def test_credential_types_have_their_own_values_and_buckets(upstream, make_gateway, client):
    policies = {
        "customer": {
            "key": ["customer"],
            "burst": 2,
            **FROZEN,
            "by_credential_type": {"direct": {"burst": 4}, "delegate": {"burst": 1}},
        }
    }
    gw = await make_gateway(upstream.url, **config(policies, {"rate_limit": ["customer"]}))
    # agent tokens and access-key-like credentials of one customer share the base bucket
    assert await statuses(client, gw, 1, bearer(type="agent")) == [200]
    assert await statuses(client, gw, 2, bearer(type="accesskey")) == [200, 429]
    assert await statuses(client, gw, 5, bearer(type="direct")) == [200, 200, 200, 200, 429]
    assert await statuses(client, gw, 2, bearer(type="delegate")) == [200, 429]
    # another customer is untouched
    assert await statuses(client, gw, 1, bearer(customer_id="c2")) == [200]


async def test_plans_change_the_values(upstream, make_gateway, client):
    policies = {"customer": {"key": ["customer"], "burst": 1, **FROZEN, "plans": {"pro": {"burst": 3}}}}
    gw = await make_gateway(upstream.url, **config(policies, {"rate_limit": ["customer"]}))
    assert await statuses(client, gw, 2, bearer(customer_id="free-c")) == [200, 429]
    assert await statuses(client, gw, 4, bearer(customer_id="pro-c", plan="pro")) == [200, 200, 200, 429]


async def test_cost_per_request(upstream, make_gateway, client):
    gw = await make_gateway(
        upstream.url,
        **config(
            {"per-ip": {"key": ["ip"], "burst": 5, **FROZEN}},
            {"auth": "none", "rate_limit": ["per-ip"], "cost": 2},
        ),
    )
    assert await statuses(client, gw, 3) == [200, 200, 429]


async def test_shadow_policies_count_but_never_block(upstream, make_gateway, client):
    policies = {
        "real": {"key": ["ip"], "burst": 10, **FROZEN},
        "trial": {"key": ["ip"], "burst": 1, **FROZEN, "shadow": True},
    }
    gw = await make_gateway(
        upstream.url, **config(policies, {"auth": "none", "rate_limit": ["real", "trial"]})
    )
    async with client.get(f"{gw.url}/echo/x") as resp:
        await resp.read()
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 200
        # the headers speak for enforced policies only
        assert resp.headers["X-RateLimit-Limit"] == "10"
        assert resp.headers["X-RateLimit-Remaining"] == "8"


async def test_most_restrictive_policy_speaks_and_ietf_fields_list_all(upstream, make_gateway, client):
    policies = {
        "wide": {"key": ["ip"], "burst": 100, **FROZEN},
        "narrow": {"key": ["customer"], "rate": 2, "period": 1, "burst": 4},
    }
    gw = await make_gateway(
        upstream.url, **config(policies, {"rate_limit": ["wide", "narrow"]}, ietf_headers=True)
    )
    async with client.get(f"{gw.url}/echo/x", headers=bearer()) as resp:
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Limit"] == "4"
        assert resp.headers["X-RateLimit-Remaining"] == "3"
        assert resp.headers["RateLimit-Policy"] == '"wide";q=100;w=360000, "narrow";q=4;w=2'
        assert resp.headers["RateLimit"].startswith('"wide";r=99;t=')
        assert '"narrow";r=3;t=1' in resp.headers["RateLimit"]


async def test_a_request_rejected_by_one_policy_consumes_nothing_from_the_others(
    upstream, make_gateway, client, redis_url
):
    # a per-instance IP policy in memory and a per-route policy in Redis, checked together: all or nothing
    policies = {
        "ip": {"key": ["ip"], "burst": 3, **FROZEN, "scope": "local"},
        "per-route": {"key": ["route"], "burst": 1, **FROZEN},
    }
    gw_routes = [
        {"name": "one", "prefix": "/echo/one", "auth": "none", "rate_limit": ["ip", "per-route"]},
        {"name": "two", "prefix": "/echo/two", "auth": "none", "rate_limit": ["ip", "per-route"]},
    ]
    gw = await make_gateway(
        upstream.url,
        redis={"url": redis_url},
        **{**config(policies, {}, ietf_headers=True), "routes": gw_routes},
    )
    codes = []
    for _ in range(4):
        async with client.get(f"{gw.url}/echo/one/x") as resp:
            codes.append(resp.status)
    assert codes == [200, 429, 429, 429]
    async with client.get(f"{gw.url}/echo/two/x") as resp:
        assert resp.status == 200
        # only the two admitted requests used the IP bucket; the three rejected ones were refunded
        assert '"ip";r=1;' in resp.headers["RateLimit"]


async def test_credential_floods_are_limited_before_any_verification(upstream, make_gateway, client):
    calls = []

    async def me(request: web.Request) -> web.Response:
        calls.append(request.query.get("accesskey"))
        return web.json_response({"error": "no"}, status=401)

    app = web.Application()
    app.router.add_get("/v1.0/me", me)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        gw = await make_gateway(
            upstream.url,
            auth={"introspect": {"url": f"http://127.0.0.1:{runner.addresses[0][1]}/v1.0/me"}},
            rate_limit={"policies": {"per-ip": {"key": ["ip"], "burst": 3, **FROZEN}}},
            routes=[{"name": "api", "prefix": "/", "rate_limit": ["per-ip"]}],
        )
        codes = []
        for i in range(30):
            async with client.get(f"{gw.url}/echo/x?accesskey=random-{i}") as resp:
                codes.append(resp.status)
        assert codes == [401] * 3 + [429] * 27
        assert len(calls) == 3  # no verification work once the IP is over its limit
    finally:
        await runner.cleanup()


async def test_counts_are_shared_by_instances_through_redis(upstream, make_gateway, client, redis_url):
    settings = config({"cust": {"key": ["customer"], "burst": 4, **FROZEN}}, {"rate_limit": ["cust"]})
    one = await make_gateway(upstream.url, redis={"url": redis_url}, **settings)
    two = await make_gateway(upstream.url, redis={"url": redis_url}, **settings)
    results = []
    for gw in (one, two, one, two, one, two):
        results += await statuses(client, gw, 1, bearer())
    assert results == [200, 200, 200, 200, 429, 429]


async def test_redis_unreachable_follows_each_policys_mode(upstream, make_gateway, client):
    from redis_server import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    policies = {
        "open": {"key": ["customer"], "burst": 1, **FROZEN, "on_redis_error": "open"},
        "closed": {"key": ["customer"], "burst": 100, **FROZEN, "on_redis_error": "closed"},
    }
    fail_open = await make_gateway(
        upstream.url, redis={"url": dead}, **config(policies, {"rate_limit": ["open"]})
    )
    assert await statuses(client, fail_open, 3, bearer()) == [200, 200, 200]
    fail_closed = await make_gateway(
        upstream.url, redis={"url": dead}, **config(policies, {"rate_limit": ["closed"]})
    )
    started = time.monotonic()
    async with client.get(f"{fail_closed.url}/echo/x", headers=bearer()) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["reason"] == "SERVICE_UNAVAILABLE"
    assert time.monotonic() - started < 2.0


async def test_a_429_describes_the_policy_that_blocked_it(upstream, make_gateway, client):
    """A monthly quota of 2 and a rate with burst 1: the second request is blocked by the rate while the
    quota would still admit it; the headers must not send the client to the month's end."""
    policies = {
        "monthly": {"key": ["customer"], "algorithm": "quota", "window": "month", "limit": 2},
        "rate": {"key": ["customer"], "burst": 1, **FROZEN},
    }
    gw = await make_gateway(upstream.url, **config(policies, {"rate_limit": ["monthly", "rate"]}))
    assert await statuses(client, gw, 1, bearer()) == [200]
    async with client.get(f"{gw.url}/echo/x", headers=bearer()) as resp:
        assert resp.status == 429
        assert (resp.headers["X-RateLimit-Limit"], resp.headers["X-RateLimit-Remaining"]) == ("1", "0")
        reset, wait = int(resp.headers["X-RateLimit-Reset"]), int(resp.headers["Retry-After"])
        assert (await resp.json())["error"]["details"] == [{"limited_by": "customer", "policy": "rate"}]
    assert time.time() + 3590 < reset <= time.time() + wait + 1


async def test_a_quotas_reset_header_is_exactly_the_window_end(upstream, make_gateway, client):
    policies = {"monthly": {"key": ["ip"], "algorithm": "quota", "window": "month", "limit": 5}}
    gw = await make_gateway(upstream.url, **config(policies, {"auth": "none", "rate_limit": ["monthly"]}))
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 200
        reset = int(resp.headers["X-RateLimit-Reset"])
    _, month_end = calendar_window(time.time(), "month", ZoneInfo("UTC"))
    assert reset == month_end


@pytest.mark.parametrize("with_redis", [False, True])
async def test_a_request_the_identity_stage_rejects_gives_back_its_ip_count(
    upstream, make_gateway, client, request, with_redis
):
    """All or nothing across the two stages: one customer over its own limit must not use up the IP limit
    that other customers behind the same address share. A failed authentication still counts against the
    IP (that is why the IP is limited before authentication)."""
    policies = {
        "ip": {"key": ["ip"], "burst": 3, **FROZEN, "scope": "local"},
        "cust": {"key": ["customer"], "burst": 1, **FROZEN},
    }
    extra = {"redis": {"url": request.getfixturevalue("redis_url")}} if with_redis else {}
    gw = await make_gateway(upstream.url, **extra, **config(policies, {"rate_limit": ["ip", "cust"]}))
    assert await statuses(client, gw, 3, bearer(customer_id="c1")) == [200, 429, 429]
    assert await statuses(client, gw, 1, {"Authorization": "Bearer not-a-token"}) == [401]
    assert await statuses(client, gw, 1, bearer(customer_id="c2")) == [200]
    async with client.get(f"{gw.url}/echo/x", headers=bearer(customer_id="c3")) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["details"] == [{"limited_by": "ip", "policy": "ip"}]


def test_shared_policies_before_authentication_only_on_routes_without_an_identity_stage():
    """RateLimiter.refund gives back only in-process counts; that suffices because a route whose second
    stage could refuse a request checks nothing shared in its first."""
    policies = {
        "ip-local": {"key": ["ip"], "burst": 3, **FROZEN, "scope": "local"},
        "ip-shared": {"key": ["ip"], "burst": 3, **FROZEN},
        "route-shared": {"key": ["route"], "burst": 3, **FROZEN},
        "cust": {"key": ["customer"], "burst": 1, **FROZEN},
    }
    names = list(policies)
    routes = [
        {"name": f"r{i}", "path": f"/r{i}", "rate_limit": [n for bit, n in enumerate(names) if i >> bit & 1]}
        for i in range(1, 2 ** len(names))
    ]
    raw = {**config(policies, {}), "routes": routes}
    for compiled in compile_routes(GatewayConfig.model_validate(raw)):
        if compiled.rate_limit_after_auth:
            assert all(policies[n].get("scope") == "local" for n in compiled.rate_limit_before_auth), compiled


async def test_a_team_override_below_the_cost_answers_without_a_false_retry_after(
    upstream, make_gateway, client, redis_url
):
    policies = {"team-rate": {"key": ["team"], "burst": 10, **FROZEN}}
    gw = await make_gateway(
        upstream.url, redis={"url": redis_url}, **config(policies, {"rate_limit": ["team-rate"], "cost": 5})
    )
    assert await statuses(client, gw, 1, bearer(team_id="t1")) == [200]
    admin = redis.asyncio.Redis.from_url(redis_url)
    await admin.hset(team_override_key("t1"), "team-rate:limit", "2")
    await admin.aclose()
    async with client.get(f"{gw.url}/echo/x", headers=bearer(team_id="t1")) as resp:
        assert resp.status == 429
        assert "Retry-After" not in resp.headers
        assert resp.headers["X-RateLimit-Limit"] == "2"
        error = (await resp.json())["error"]
    assert error["details"] == [
        {"limited_by": "team", "policy": "team-rate", "cost_exceeds_limit": True, "cost": 5, "limit": 2}
    ]
    assert "cannot pass until" in error["message"]


async def test_redis_is_ready_before_the_first_request(upstream, make_gateway: MakeGateway, redis_url: str):
    # Connecting and loading the script at start: under load, the first check would otherwise pay for
    # both and could outlast the budget, which looks like a slow Redis.
    policy = {"per-ip": {"key": ["ip"], "burst": 5, **FROZEN}}
    await make_gateway(upstream.url, redis={"url": redis_url}, **config(policy, {"rate_limit": ["per-ip"]}))
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        [loaded] = await client.script_exists(CHECK.sha)
        assert loaded
    finally:
        await client.aclose()


async def test_a_gateway_starts_while_redis_is_down(upstream, make_gateway: MakeGateway, client):
    free = (await refused_url()).rsplit(":", 1)[1]
    policy = {"per-ip": {"key": ["ip"], "burst": 5, "on_redis_error": "open", **FROZEN}}
    with capture_logs() as logs:
        gw = await make_gateway(
            upstream.url,
            redis={"url": f"redis://127.0.0.1:{free}"},
            **config(policy, {"rate_limit": ["per-ip"]}),
        )
    assert [e["error"] for e in logs if e["event"] == "redis_unavailable_at_start"] == ["ConnectionError"]
    async with client.get(f"{gw.url}/echo/x", headers=bearer()) as resp:
        assert resp.status == 200  # on_redis_error: open
