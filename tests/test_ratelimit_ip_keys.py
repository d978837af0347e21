"""Per-IP limits key a client by its network (IPv6 /64 by default), and the in-process table they are
counted in is bounded, expires full buckets and reports itself; through a real gateway over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from conftest import RunningGateway
from structlog.testing import capture_logs
from test_observability import growth, scrape, value
from upstream_server import refused_url

from gateway.auth.identity import Identity
from gateway.config import ConfigError, GatewayConfig, PolicyConfig, load_config
from gateway.ratelimit.ip_prefix import IpPrefixes
from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.policies import Caller, compile_policies, team_override_key

FROZEN = {"rate": 1, "period": 3600}  # no refill within a test: counts are exact
BURST = 3


# --- the key of an address ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "ipv4", "ipv6", "key"),
    [
        ("2001:db8:1:2:3:4:5:6", 32, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 32, 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::9", 32, 64, "2001:db8:1:2::/64"),  # one spelling per network
        ("2001:db8:1:3::1", 32, 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2:3:4:5:6", 32, 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:3:4:5:6", 32, 56, "2001:db8:1::/56"),
        ("2001:db8:1:ff:3:4:5:6", 32, 56, "2001:db8:1::/56"),
        ("2001:db8:1:2:3:4:5:6", 32, 128, "2001:db8:1:2:3:4:5:6"),  # full length: the address, as before
        ("2001:db8:1:2:3:4:5:6%eth0", 32, 64, "2001:db8:1:2::/64"),  # a zone names an interface
        ("2001:db8:1:2:3:4:5:6%eth0", 32, 128, "2001:db8:1:2:3:4:5:6"),
        # Networks the operator assigns, where one /64 holds many hosts: per address.
        ("::1", 32, 64, "::1"),
        ("fe80::1%eth0", 32, 64, "fe80::1"),
        ("fd12:3456:789a:1::5", 32, 64, "fd12:3456:789a:1::5"),
        ("fc00::5", 32, 64, "fc00::5"),
        # Addresses that stand for an IPv4 client: NAT64 (well-known prefix), 6to4, Teredo (RFC 4380 example).
        ("64:ff9b::203.0.113.9", 32, 64, "203.0.113.9"),
        ("64:ff9b::203.0.113.9", 24, 64, "203.0.113.0/24"),
        ("2002:cb00:7109::1", 32, 64, "203.0.113.9"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", 32, 64, "192.0.2.45"),
        ("64:ff9b:1::1", 32, 64, "64:ff9b:1::/64"),  # a local-use NAT64 prefix is the operator's own choice
        ("203.0.113.9", 32, 64, "203.0.113.9"),
        ("203.0.113.9", 24, 64, "203.0.113.0/24"),
        ("::ffff:203.0.113.9", 32, 64, "203.0.113.9"),  # IPv4-mapped: the IPv4 client it is
        ("::ffff:203.0.113.9", 24, 128, "203.0.113.0/24"),
        ("/run/gateway.sock", 32, 64, "/run/gateway.sock"),  # not an address: its own key
    ],
)
def test_key_of_an_address(address: str, ipv4: int, ipv6: int, key: str) -> None:
    assert IpPrefixes(ipv4=ipv4, ipv6=ipv6).key(address) == key


def test_defaults_are_a_64_for_ipv6_and_the_address_for_ipv4() -> None:
    prefixes, settings = IpPrefixes(), GatewayConfig().rate_limit
    assert (prefixes.ipv4, prefixes.ipv6) == (settings.ipv4_prefix, settings.ipv6_prefix) == (32, 64)


@pytest.mark.parametrize(
    ("setting", "bad", "allowed"),
    [("ipv6_prefix", 8, "greater than or equal to 16"), ("ipv6_prefix", 129, "less than or equal to 128"),
     ("ipv4_prefix", 33, "less than or equal to 32"), ("ipv4_prefix", 4, "greater than or equal to 8"),
     ("local_max_keys", 15, "greater than or equal to 16")],
)  # fmt: skip
def test_config_errors_name_the_key_the_value_and_the_range(
    tmp_path: Any, setting: str, bad: int, allowed: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"rate_limit:\n  {setting}: {bad}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert f"rate_limit.{setting} = {bad}" in message and allowed in message, message


# --- per-IP limits through the gateway ---------------------------------------------------------------------


def ip_limited(policy: dict[str, Any], **rate_limit: Any) -> dict[str, Any]:
    """A gateway that believes X-Forwarded-For from loopback, with one per-IP policy on every path."""
    return {
        "server": {"trusted_proxies": ["127.0.0.0/8", "::1/128"]},
        "rate_limit": {
            "policies": {"per-ip": {"key": ["ip"], "burst": BURST, **FROZEN, **policy}},
            **rate_limit,
        },
        "routes": [{"name": "limited", "prefix": "/", "auth": "none", "rate_limit": ["per-ip"]}],
    }


async def status_from(client: aiohttp.ClientSession, gw: RunningGateway, address: str | None) -> int:
    headers = {} if address is None else {"X-Forwarded-For": address}
    async with client.get(f"{gw.url}/echo/x", headers=headers) as resp:
        await resp.read()
        return resp.status


async def statuses_from(client: aiohttp.ClientSession, gw: RunningGateway, addresses: list[str]) -> list[int]:
    return [await status_from(client, gw, address) for address in addresses]


def rotated(network: str, count: int) -> list[str]:
    """`count` different addresses of a /64, as a host picking a fresh one per request would."""
    return [f"{network}:{i:x}:{i * 7919 % 65536:x}:{i * 104729 % 65536:x}:{i + 1:x}" for i in range(count)]


@pytest.mark.parametrize("scope", ["local", "shared"])
async def test_a_64_rotating_through_addresses_is_limited_as_one_client(
    upstream, make_gateway, client, redis_url, scope
):
    gw = await make_gateway(upstream.url, redis={"url": redis_url}, **ip_limited({"scope": scope}))
    codes = await statuses_from(client, gw, rotated("2001:db8:aaaa:1", 40))
    assert codes == [200] * BURST + [429] * (40 - BURST)
    # Another /64 of the same /48 is another client, with a full bucket of its own.
    codes = await statuses_from(client, gw, rotated("2001:db8:aaaa:2", 5))
    assert codes == [200] * BURST + [429] * 2


async def test_shared_counts_live_in_redis_under_the_network(upstream, make_gateway, client, redis_url):
    gw = await make_gateway(upstream.url, redis={"url": redis_url}, **ip_limited({}))
    await statuses_from(client, gw, ["2001:db8:bbbb:1::5", "2001:db8:bbbb:1:ffff::6", "203.0.113.7"])
    store = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = sorted(k.decode() for k in await store.keys("gw:rl:*"))
    finally:
        await store.aclose()
    # Readable, and one per client: the /64 and the IPv4 address, never the single IPv6 addresses.
    assert keys == ["gw:rl:{ip:2001:db8:bbbb:1::/64}:per-ip", "gw:rl:{ip:203.0.113.7}:per-ip"]


async def test_ipv6_prefix_128_counts_every_address_apart(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, **ip_limited({"scope": "local"}, ipv6_prefix=128))
    assert await statuses_from(client, gw, rotated("2001:db8:cccc:1", 10)) == [200] * 10
    assert await statuses_from(client, gw, ["2001:db8:cccc::1"] * 4) == [200] * BURST + [429]


async def test_a_shorter_prefix_counts_a_whole_site_as_one(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, **ip_limited({"scope": "local"}, ipv6_prefix=48, ipv4_prefix=24))
    site = ["2001:db8:dddd:1::1", "2001:db8:dddd:2::1", "2001:db8:dddd:ffff::1", "2001:db8:dddd:3::1"]
    assert await statuses_from(client, gw, site) == [200] * BURST + [429]
    office = ["198.51.100.1", "198.51.100.200", "198.51.100.7", "198.51.100.9"]
    assert await statuses_from(client, gw, office) == [200] * BURST + [429]
    assert await status_from(client, gw, "198.51.101.1") == 200  # the next /24 is another client


async def test_ipv4_mapped_addresses_count_as_the_ipv4_client(upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, **ip_limited({"scope": "local"}, ipv4_prefix=24))
    addresses = ["::ffff:192.0.2.1", "192.0.2.2", "::ffff:c000:203", "192.0.2.4"]
    assert await statuses_from(client, gw, addresses) == [200] * BURST + [429]


def _dual_stack() -> bool:
    """[::] takes IPv4 clients too (not so where IPv6 is off or net.ipv6.bindv6only is set)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::", 0))
            return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except OSError:
        return False


@pytest.mark.skipif(not _dual_stack(), reason="no dual-stack IPv6 on this host")
async def test_a_dual_stack_listener_keys_its_peers_the_same_way(upstream, make_gateway, client, redis_url):
    # No proxy in front: the peer address itself. On a [::] listener an IPv4 client is ::ffff:127.0.0.1.
    settings = ip_limited({})
    settings["server"] = {"trusted_proxies": []}
    gw = await make_gateway(upstream.url, listen="[::]:0", redis={"url": redis_url}, **settings)
    port = gw.server.address[1]
    store = redis.asyncio.Redis.from_url(redis_url)
    try:
        for host in ("127.0.0.1", "[::1]"):
            async with client.get(f"http://{host}:{port}/echo/x") as resp:
                assert resp.status == 200
        keys = sorted(k.decode() for k in await store.keys("gw:rl:*"))
    finally:
        await store.aclose()
    assert keys == ["gw:rl:{ip:127.0.0.1}:per-ip", "gw:rl:{ip:::1}:per-ip"]  # loopback: per address


async def test_the_access_log_keeps_the_client_address(capsys, upstream, make_gateway, client):
    gw = await make_gateway(upstream.url, **ip_limited({"scope": "local"}))
    capsys.readouterr()
    addresses = rotated("2001:db8:eeee:1", BURST + 1)
    assert await statuses_from(client, gw, addresses) == [200] * BURST + [429]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event":"request"' in line]
    assert [(line["client_ip"], line["status"]) for line in lines] == [
        (str(ipaddress.ip_address(address)), 200 if i < BURST else 429) for i, address in enumerate(addresses)
    ]


# --- the in-process table through the gateway --------------------------------------------------------------


async def test_the_table_is_sized_by_config_reports_itself_and_evicts_the_least_recent(
    upstream, make_gateway, client
):
    gw = await make_gateway(upstream.url, **ip_limited({"scope": "local", "burst": 1}, local_max_keys=16))
    before = await scrape(client, gw)
    clients = [f"192.0.2.{i}" for i in range(1, 19)]
    assert await statuses_from(client, gw, clients) == [200] * 18  # eighteen clients, room for sixteen
    # The two least recently seen were forgotten and start again with a full bucket; the others are held.
    assert await statuses_from(client, gw, clients[2:]) == [429] * 16
    assert await statuses_from(client, gw, clients[:2]) == [200] * 2
    assert table(gw).evictions == 4 and len(table(gw)) == 16
    # The metrics are read from the table once a second.
    after = await scrape_until(
        client,
        gw,
        lambda text: (
            growth(before, text, "gateway_ratelimit_local_evictions_total") == 4
            and value(text, "gateway_ratelimit_local_keys") == 16
        ),
    )
    assert value(after, "gateway_ratelimit_local_max_keys") == 16


async def test_the_redis_fallback_counts_in_the_same_table(upstream, make_gateway, client):
    dead_redis = (await refused_url()).replace("http://", "redis://")
    settings = ip_limited({"scope": "shared", "on_redis_error": "local"}, local_max_keys=16)
    gw = await make_gateway(upstream.url, redis={"url": dead_redis}, **settings)
    clients = [f"192.0.2.{i}" for i in range(1, 19)]
    assert await statuses_from(client, gw, clients) == [200] * 18
    assert len(table(gw)) == 16 and table(gw).evictions == 2  # one bound for all in-process counts


async def test_an_idle_gateway_empties_its_table(upstream, make_gateway, client):
    # Full again 20 ms after the request: with no further traffic the upkeep still drops the bucket.
    gw = await make_gateway(upstream.url, **ip_limited({"scope": "local", "rate": 50, "period": 1}))
    assert await status_from(client, gw, "192.0.2.1") == 200
    assert len(table(gw)) == 1
    for _ in range(150):  # the upkeep runs once a second; 15 s bounds a busy box
        if len(table(gw)) == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the full bucket was never dropped")


async def test_the_upkeep_survives_a_failure_and_logs_it(upstream, make_gateway, client, monkeypatch):
    gw = await make_gateway(upstream.url, **ip_limited({"scope": "local", "rate": 50, "period": 1}))
    expire = table(gw).expire
    failures: list[int] = []

    def fails_once() -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("upkeep bug")
        expire()

    with capture_logs() as logged:
        monkeypatch.setattr(table(gw), "expire", fails_once)
        assert await status_from(client, gw, "192.0.2.1") == 200
        for _ in range(150):  # 15 s bounds a busy box; the upkeep runs once a second
            if failures and len(table(gw)) == 0:
                break
            await asyncio.sleep(0.1)
    assert failures and len(table(gw)) == 0  # it went on after the failure
    assert [e["event"] for e in logged if e["log_level"] == "error"] == ["local_table_upkeep_failed"]


def table(gw: RunningGateway) -> MemoryBackend:
    assert gw.server.gateway is not None
    return gw.server.gateway.limiter_table


async def scrape_until(
    client: aiohttp.ClientSession, gw: RunningGateway, condition: Callable[[str], bool]
) -> str:
    """Scrape, for at most 10 s, until the metrics show what the test waits for."""
    for _ in range(100):
        text = await scrape(client, gw)
        if condition(text):
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"the metrics never showed it:\n{text}")


def test_only_ip_networks_keep_a_slash_in_their_keys() -> None:
    # Ids with a "/" were hashed into their keys before networks were keys: they still are, so their
    # counts and `quota set` overrides survive an upgrade.
    policies = compile_policies(
        {
            "per-ip": PolicyConfig(key=("ip",), rate=1, burst=1),
            "per-customer": PolicyConfig(key=("customer",), rate=1, burst=1),
        }
    )
    ip = policies["per-ip"].limit_for(Caller("2001:db8::/64", None, "r"), 0.0, 1)
    assert ip is not None and ip.key == "gw:rl:{ip:2001:db8::/64}:per-ip"
    customer = Identity(credential_type="agent", customer_id="org/7")
    by_id = policies["per-customer"].limit_for(Caller(None, customer, "r"), 0.0, 1)
    digest = hashlib.sha256(b"org/7").hexdigest()[:24]
    assert by_id is not None and by_id.key == f"gw:rl:{{c:{digest}}}:per-customer"
    as_network = Identity(credential_type="agent", customer_id="10.0.0.0/8")  # an id, even if it reads so
    network_id = policies["per-customer"].limit_for(Caller(None, as_network, "r"), 0.0, 1)
    assert network_id is not None and "/" not in network_id.key
    assert "/" not in team_override_key("10.0.0.0/8")
    for odd in ("2001:DB8::/64", "2001:db8::1/64", "10.0.0.0/8/8", "a/b"):  # not as IpPrefixes writes them
        limit = policies["per-ip"].limit_for(Caller(odd, None, "r"), 0.0, 1)
        assert limit is not None and "/" not in limit.key, odd
