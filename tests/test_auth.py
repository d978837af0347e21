"""Authentication end to end: a real gateway, a real upstream, and a real introspection endpoint that
knows a few credentials (the way the shipped config identifies the API's own customers)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import structlog
from aiohttp import web
from conftest import MakeGateway, RunningGateway
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from jwt_keys import mint, rsa_key
from multidict import CIMultiDict
from structlog.testing import capture_logs
from yarl import URL

from gateway import logs
from gateway.auth import setup

KEY = "real-api-access-key-0001"
OTHER_KEY = "real-api-access-key-0002"
AGENT_TOKEN = jwt.encode(
    {"type": "agent", "agent": {"customer_id": "cust-from-token", "id": "agent-9"}, "exp": 4102444800},
    "secret-only-the-api-knows-0123456789",
    algorithm="HS256",
)
IDENTITIES: dict[str, dict[str, Any]] = {
    KEY: {
        "id": "agent-1",
        "customer_id": "cust-1",
        "team_id": "team-a",
        "username": "a@example.com",
        "permission": 64,
    },
    OTHER_KEY: {"id": "agent-2", "customer_id": "cust-2"},
    AGENT_TOKEN: {"id": "agent-9", "customer_id": "cust-9"},
}


@dataclass
class Introspection:
    """GET /v1.0/me: 200 with the identity for a known credential, 401 otherwise; can be broken on demand."""

    url: str = ""
    calls: list[str] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    mode: str = "ok"  # ok | down | hang | redirect (to /elsewhere, which knows everyone as KEY's owner)
    delay: float = 0.0
    answer: tuple[int, bytes] | None = None
    """When set, the status and JSON body given for every credential."""

    async def me(self, request: web.Request) -> web.Response:
        credential = request.query.get("accesskey") or request.headers.get("Authorization", "")[7:]
        self.calls.append(credential)
        self.request_ids.append(request.headers.get("X-Request-ID"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "down":
            return web.json_response({"error": "down"}, status=503)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "redirect":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        if self.answer is not None:
            return web.Response(status=self.answer[0], body=self.answer[1], content_type="application/json")
        if credential in IDENTITIES:
            return web.json_response(IDENTITIES[credential])
        return web.json_response({"error": {"status": "UNAUTHENTICATED"}}, status=401)

    async def elsewhere(self, _request: web.Request) -> web.Response:
        return web.json_response(IDENTITIES[KEY])


@pytest.fixture
async def introspection() -> AsyncIterator[Introspection]:
    state = Introspection()
    app = web.Application()
    app.router.add_get("/v1.0/me", state.me)
    app.router.add_get("/elsewhere", state.elsewhere)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1.0/me"
    yield state
    await runner.cleanup()


def routes(**extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "open", "prefix": "/echo/open", "auth": "none"},
        {"name": "maybe", "prefix": "/echo/maybe", "auth": "optional"},
        {"name": "hidden", "prefix": "/echo/hidden", "hide_credentials": True},
        {"name": "agents", "prefix": "/echo/agents", "require": {"credential_types": ["agent"]}},
        {"name": "team-a", "prefix": "/echo/team-a", "require": {"claims": {"team_id": "team-a"}}},
        {  # the README's example: the API's agent permission, from a token's `agent` claim or from /me
            "name": "admins",
            "prefix": "/echo/admins",
            "require": {
                "credential_types": ["agent", "accesskey"],
                "claims": {"agent.permission": ["64", "32"]},
            },
        },
        {"name": "api", "prefix": "/", **extra},
    ]


@pytest.fixture
async def gw(upstream, introspection, make_gateway: MakeGateway) -> RunningGateway:
    return await make_gateway(
        upstream.url,
        routes=routes(),
        auth={"introspect": {"url": introspection.url, "negative_ttl": 60}},
    )


def envelope_of(body: bytes) -> dict[str, Any]:
    return json.loads(body)["error"]


async def test_no_credential_is_401_authentication_required(gw, upstream, client):
    async with client.get(f"{gw.url}/echo/x") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="voipbin"'
        error = envelope_of(await resp.read())
    assert (error["status"], error["reason"]) == ("UNAUTHENTICATED", "AUTHENTICATION_REQUIRED")
    assert upstream.requests == []


async def test_access_key_identifies_the_caller_to_the_upstream(gw, upstream, client):
    async with client.get(f"{gw.url}/echo/x?accesskey={KEY}&page_size=10") as resp:
        assert resp.status == 200
    seen = upstream.last
    assert seen.header("X-Gateway-Customer-Id") == "cust-1"
    assert seen.header("X-Gateway-Team-Id") == "team-a"
    assert seen.header("X-Gateway-Credential-Type") == "accesskey"
    assert seen.header("X-Gateway-Credential-Id") == "agent-1"
    # hide_credentials is off by default: the real API authorizes by the same credential
    assert seen.raw_path == f"/echo/x?accesskey={KEY}&page_size=10"


@pytest.mark.parametrize("how", ["cookie", "query"])
async def test_access_key_from_cookie_or_query(gw, upstream, client, how):
    if how == "cookie":
        resp = await client.get(f"{gw.url}/echo/x", headers={"Cookie": f"accesskey={KEY}"})
    else:
        resp = await client.get(f"{gw.url}/echo/x?accesskey={KEY}")
    assert resp.status == 200
    assert upstream.last.header("X-Gateway-Customer-Id") == "cust-1"


async def test_unknown_key_is_401_invalid_credentials_without_echoing_it(gw, upstream, client):
    secret = "definitely-not-a-valid-key-XYZ"
    with capture_logs() as logs:
        async with client.get(f"{gw.url}/echo/x?accesskey={secret}") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="voipbin", error="invalid_token"'
            body = await resp.read()
    assert envelope_of(body)["reason"] == "INVALID_CREDENTIALS"
    assert secret.encode() not in body
    assert secret not in repr(logs)
    assert any(entry.get("check") == "introspection_rejected" for entry in logs)
    assert upstream.requests == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_jwt_via_introspection_with_any_scheme_case(gw, upstream, client, scheme):
    async with client.get(f"{gw.url}/echo/x", headers={"Authorization": f"{scheme} {AGENT_TOKEN}"}) as resp:
        assert resp.status == 200
    seen = upstream.last
    # type from the token (authentic once the upstream accepted it), customer from the answer
    assert seen.header("X-Gateway-Credential-Type") == "agent"
    assert seen.header("X-Gateway-Customer-Id") == "cust-9"


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"Authorization": f"Bearer {AGENT_TOKEN}"}, f"accesskey={KEY}"),
        ({}, f"accesskey={KEY}&accesskey={OTHER_KEY}"),
        ({"Authorization": "Bearer"}, ""),
        ({"Authorization": "Bearer "}, ""),
        ({"Cookie": f"accesskey={OTHER_KEY}"}, f"accesskey={KEY}"),
    ],
)
async def test_conflicting_or_empty_credentials_are_401(gw, upstream, introspection, client, headers, query):
    async with client.get(URL(f"{gw.url}/echo/x?{query}", encoded=True), headers=headers) as resp:
        assert resp.status == 401
        assert 'error="invalid_request"' in resp.headers["WWW-Authenticate"]
        assert envelope_of(await resp.read())["reason"] == "INVALID_CREDENTIALS"
    assert introspection.calls == []
    assert upstream.requests == []


async def test_two_authorization_headers_are_401(gw, client):
    headers = CIMultiDict(
        [("Authorization", f"Bearer {AGENT_TOKEN}"), ("Authorization", f"Bearer {AGENT_TOKEN}x")]
    )
    async with client.get(f"{gw.url}/echo/x", headers=headers) as resp:
        assert resp.status == 401


@pytest.mark.parametrize("path", ["/echo/open/x", f"/echo/x?accesskey={KEY}"])
async def test_client_sent_identity_headers_are_always_removed(gw, upstream, client, path):
    spoofed = {
        "X-Gateway-Customer-Id": "evil",
        "X-Gateway-Team-Id": "evil",
        "X-Gateway-Credential-Type": "delegate",
        "X-Gateway-Credential-Id": "evil",
    }
    async with client.get(gw.url + path, headers=spoofed) as resp:
        assert resp.status == 200
    for name in spoofed:
        assert upstream.last.header(name) != "evil"
    if "open" in path:
        assert all(upstream.last.header(name) is None for name in spoofed)


async def test_optional_route(gw, upstream, client):
    async with client.get(f"{gw.url}/echo/maybe/x") as resp:
        assert resp.status == 200
    assert upstream.last.header("X-Gateway-Customer-Id") is None
    async with client.get(f"{gw.url}/echo/maybe/x?accesskey={KEY}") as resp:
        assert resp.status == 200
    assert upstream.last.header("X-Gateway-Customer-Id") == "cust-1"
    async with client.get(f"{gw.url}/echo/maybe/x?accesskey=wrong") as resp:
        assert resp.status == 401


async def test_hide_credentials_strips_header_query_and_cookie(gw, upstream, client):
    target = f"/echo/hidden/x?a=%2F&accesskey={KEY}&b=1+2"
    async with client.get(URL(gw.url + target, encoded=True), headers={"Cookie": "theme=dark"}) as resp:
        assert resp.status == 200
    seen = upstream.last
    assert seen.raw_path == "/echo/hidden/x?a=%2F&b=1+2"
    assert seen.header("Cookie") == "theme=dark"
    assert seen.header("X-Gateway-Customer-Id") == "cust-1"
    async with client.get(
        f"{gw.url}/echo/hidden/y",
        headers={"Authorization": f"Bearer {AGENT_TOKEN}", "Cookie": f"token={AGENT_TOKEN}"},
    ) as resp:
        assert resp.status == 200
    seen = upstream.last
    assert seen.header("Authorization") is None
    assert seen.header("Cookie") is None
    assert seen.raw_path == "/echo/hidden/y"


async def test_route_requirements_are_403(gw, upstream, client):
    async with client.get(f"{gw.url}/echo/agents/x?accesskey={KEY}") as resp:
        assert resp.status == 403
        assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
        error = envelope_of(await resp.read())
    assert (error["status"], error["reason"]) == ("PERMISSION_DENIED", "PERMISSION_DENIED")
    async with client.get(
        f"{gw.url}/echo/agents/x", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}
    ) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/echo/team-a/x?accesskey={KEY}") as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/echo/team-a/x?accesskey={OTHER_KEY}") as resp:
        assert resp.status == 403


async def test_a_stale_pooled_connection_does_not_fail_introspection(upstream, make_gateway, client):
    # /stale answers the first request on a connection and drops the connection when the next one arrives:
    # the second key's check meets a pooled connection the upstream has just closed, and is sent again.
    gw = await make_gateway(
        upstream.url, routes=[{"name": "api", "prefix": "/echo"}], auth={"introspect": {"path": "/stale/me"}}
    )
    for key in ("first-key", "second-key"):
        async with client.get(f"{gw.url}/echo/x?accesskey={key}") as resp:
            assert resp.status == 200, key
    checks = [seen.raw_path for seen in upstream.requests if seen.raw_path.startswith("/stale")]
    assert checks == ["/stale/me?accesskey=first-key", *["/stale/me?accesskey=second-key"] * 2]


async def test_introspection_answers_are_cached_and_shared(gw, introspection, client):
    for _ in range(3):
        async with client.get(f"{gw.url}/echo/x?accesskey={KEY}") as resp:
            assert resp.status == 200
    for _ in range(3):
        async with client.get(f"{gw.url}/echo/x?accesskey=nope") as resp:
            assert resp.status == 401
    assert introspection.calls == [KEY, "nope"]


async def test_a_burst_of_one_new_credential_costs_one_introspection(gw, introspection, client):
    introspection.delay = 0.1

    async def one() -> int:
        async with client.get(f"{gw.url}/echo/x?accesskey={OTHER_KEY}") as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(20))) == [200] * 20
    assert introspection.calls == [OTHER_KEY]
    assert introspection.request_ids[0] is not None


async def test_introspection_down_cached_keep_working_unknown_get_503(gw, introspection, client):
    async with client.get(f"{gw.url}/echo/x?accesskey={KEY}") as resp:
        assert resp.status == 200
    introspection.mode = "down"
    async with client.get(f"{gw.url}/echo/x?accesskey={KEY}") as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/echo/x?accesskey={OTHER_KEY}") as resp:
        assert resp.status == 503
        error = envelope_of(await resp.read())
    assert (error["status"], error["reason"]) == ("UNAVAILABLE", "SERVICE_UNAVAILABLE")


async def test_introspection_hanging_is_503_within_its_timeout(upstream, introspection, make_gateway, client):
    gw = await make_gateway(
        upstream.url, routes=routes(), auth={"introspect": {"url": introspection.url, "timeout": 0.2}}
    )
    introspection.mode = "hang"
    async with asyncio.timeout(5), client.get(f"{gw.url}/echo/x?accesskey={KEY}") as resp:
        assert resp.status == 503


async def test_fail_open_forwards_without_identity(upstream, introspection, make_gateway, client):
    gw = await make_gateway(
        upstream.url,
        routes=routes(),
        auth={"introspect": {"url": introspection.url}, "on_unavailable": "open"},
    )
    introspection.mode = "down"
    async with client.get(
        f"{gw.url}/echo/x?accesskey={KEY}", headers={"X-Gateway-Customer-Id": "evil"}
    ) as resp:
        assert resp.status == 200
    assert upstream.last.header("X-Gateway-Customer-Id") is None


async def test_switched_off_source_is_not_a_credential(upstream, introspection, make_gateway, client):
    gw = await make_gateway(
        upstream.url,
        routes=routes(),
        auth={"introspect": {"url": introspection.url}, "sources": {"query_accesskey": False}},
    )
    async with client.get(f"{gw.url}/echo/x?accesskey={KEY}") as resp:
        assert resp.status == 401
        assert envelope_of(await resp.read())["reason"] == "AUTHENTICATION_REQUIRED"
    assert introspection.calls == []


async def test_identity_header_names_are_configurable(upstream, introspection, make_gateway, client):
    gw = await make_gateway(
        upstream.url,
        routes=routes(),
        auth={"introspect": {"url": introspection.url}, "headers": {"customer_id": "X-Customer"}},
    )
    async with client.get(f"{gw.url}/echo/x?accesskey={KEY}", headers={"X-Customer": "evil"}) as resp:
        assert resp.status == 200
    assert upstream.last.header("X-Customer") == "cust-1"
    assert upstream.last.header("X-Gateway-Customer-Id") is None


# --- keys the gateway holds: JWT secrets and its own access keys -----------------------------------------

JWT_SECRET = "gateway-test-secret-with-32-bytes-or-more!"


def api_token(**claims: Any) -> str:
    """A token shaped like the API's own: HS256, `type`, `agent.customer_id`, expiry in `expire`."""
    body = {
        "type": "agent",
        "agent": {"customer_id": "cust-jwt", "id": "agent-7"},
        "expire": "2099-01-01 00:00:00",
    }
    return jwt.encode({**body, **claims}, JWT_SECRET, algorithm="HS256")


@pytest.fixture
async def jwt_gw(upstream, make_gateway, monkeypatch) -> RunningGateway:
    monkeypatch.setenv("TEST_JWT_SECRET", JWT_SECRET)
    return await make_gateway(
        upstream.url,
        routes=routes(),
        auth={
            "jwt": {
                "keys": [{"algorithms": ["HS256"], "secret_env": "TEST_JWT_SECRET"}],
                "expiry_claim": "expire",
            },
            "introspect": {"jwt": False},
            "access_keys": {"stores": []},
        },
    )


async def test_the_apis_own_token_shape_is_verified_locally(jwt_gw, upstream, client):
    async with client.get(f"{jwt_gw.url}/echo/x", headers={"Authorization": f"Bearer {api_token()}"}) as resp:
        assert resp.status == 200
    seen = upstream.last
    assert seen.header("X-Gateway-Customer-Id") == "cust-jwt"
    assert seen.header("X-Gateway-Credential-Type") == "agent"
    async with client.get(f"{jwt_gw.url}/echo/x?token={api_token(type='direct', customer_id='c2')}") as resp:
        assert resp.status == 200
    assert upstream.last.header("X-Gateway-Credential-Type") == "direct"


@pytest.mark.parametrize(
    "token",
    [
        api_token(expire="2001-01-01 00:00:00"),
        jwt.encode(
            {"type": "agent", "expire": "2099-01-01 00:00:00"}, "another-secret-also-32-bytes-long!!", "HS256"
        ),
        jwt.encode({"type": "agent", "expire": "2099-01-01 00:00:00"}, None, algorithm="none"),
        "not.a.jwt",
        "x" * 100_000,
        "." * 50_000,
        "ü.ü.ü",
    ],
    ids=["expired", "wrong-key", "alg-none", "garbage", "100kb", "dots", "non-ascii"],
)
async def test_bad_tokens_are_401_never_500(jwt_gw, upstream, client, token):
    with capture_logs() as logs:
        async with client.get(f"{jwt_gw.url}/echo/x", headers={"Authorization": f"Bearer {token}"}) as resp:
            body = await resp.read()
    assert resp.status in (401, 431)  # a 100 KB header is over the header limit before auth sees it
    assert token.encode()[:40] not in body
    assert all(token[:40] not in repr(entry) for entry in logs)
    assert upstream.requests == []


async def test_gateway_issued_access_key_from_redis(upstream, make_gateway, client, redis_url, monkeypatch):
    import redis.asyncio

    from gateway.auth.key_stores import RedisKeyStore

    monkeypatch.setenv("TEST_PEPPER", "pepper-for-tests")
    gw = await make_gateway(
        upstream.url,
        routes=routes(),
        redis={"url": redis_url},
        auth={"access_keys": {"stores": ["redis"], "pepper_env": "TEST_PEPPER", "cache_ttl": 0.2}},
    )
    store_client = redis.asyncio.from_url(redis_url, decode_responses=True)
    store = RedisKeyStore(store_client, b"pepper-for-tests")
    key, record = await store.create("cust-r", "team-r", "ci", None)
    try:
        async with client.get(f"{gw.url}/echo/x?accesskey={key}") as resp:
            assert resp.status == 200
        seen = upstream.last
        assert (seen.header("X-Gateway-Customer-Id"), seen.header("X-Gateway-Team-Id")) == (
            "cust-r",
            "team-r",
        )
        assert seen.header("X-Gateway-Credential-Type") == "accesskey"
        assert seen.header("X-Gateway-Credential-Id") == record.id

        malformed = key[:-1] + ("A" if key[-1] != "A" else "B")
        async with client.get(f"{gw.url}/echo/x?accesskey={malformed}") as resp:
            assert resp.status == 401

        await store.revoke(record.id)
        for _ in range(100):  # revocation applies within cache_ttl (0.2 s here)
            async with client.get(f"{gw.url}/echo/x?accesskey={key}") as resp:
                if resp.status == 401:
                    break
            await asyncio.sleep(0.02)
        assert resp.status == 401
    finally:
        await store_client.aclose()


@contextlib.contextmanager
def real_logs(capfd: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """The gateway's real logging, as `serve` configures it (structlog, the standard library's loggers and
    the access log), at debug level; yields a function returning all of stdout and stderr since its last
    call. Entered inside the test itself: the handler keeps the sys.stdout of the moment it is set up."""
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    saved = (root.handlers[:], root.level, access.disabled, structlog.get_config())
    logs.configure("debug", "json")
    # Loggers would otherwise be frozen to this configuration on first use, and hide from later tests.
    structlog.configure(cache_logger_on_first_use=False)
    capfd.readouterr()
    try:
        yield lambda: "".join(capfd.readouterr())
    finally:
        root.handlers[:], level, access.disabled, config = saved
        root.setLevel(level)
        structlog.configure(**config)


def leaked(output: str, secrets: list[str]) -> list[str]:
    """The secrets (or a JWT's segments) that appear in `output`."""
    pieces = {piece for secret in secrets for piece in (secret, *secret.split(".")) if len(piece) >= 8}
    return sorted(piece for piece in pieces if piece in output)


async def test_no_credential_reaches_any_log_line(capfd, upstream, introspection, make_gateway, client):
    gw = await make_gateway(upstream.url, routes=routes(), auth={"introspect": {"url": introspection.url}})
    wrong, huge = "wrong-secret-key-zzz", "h" * 9000
    secrets = [KEY, OTHER_KEY, AGENT_TOKEN, wrong, huge, "injected-secret-1"]
    requests: list[tuple[str, dict[str, str]]] = [
        (f"/echo/x?accesskey={KEY}", {}),
        ("/echo/x", {"Cookie": f"accesskey={OTHER_KEY}"}),
        ("/echo/x", {"Authorization": f"Bearer {AGENT_TOKEN}"}),
        ("/echo/x", {"Cookie": f"token={AGENT_TOKEN}"}),
        (f"/echo/x?token={AGENT_TOKEN}&page_size=1", {}),
        (f"/echo/x?accesskey={wrong}", {}),
        (f"/echo/x?accesskey={KEY}&token={AGENT_TOKEN}", {}),
        (f"/echo/agents/x?accesskey={KEY}", {}),
        ("/echo/x?token=injected-secret-1%0D%0AX:%201", {}),
        ("/echo/x", {"Authorization": f"Bearer {huge}"}),
    ]
    with real_logs(capfd) as output_since:
        for target, headers in requests:
            async with client.get(URL(gw.url + target, encoded=True), headers=headers) as resp:
                await resp.read()
        introspection.mode = "down"
        async with client.get(f"{gw.url}/echo/x?accesskey={wrong}x") as resp:
            assert resp.status == 503
        output = output_since()
    assert output.count('"event":"request"') == len(requests) + 1, "the scan must see every access line"
    assert '"event":"auth_failed"' in output and '"event":"introspection_failed"' in output
    assert leaked(output, secrets) == []


def test_the_log_scan_sees_every_channel(capfd):
    """The scan above is only worth something if a leak through any logger would reach it."""
    with real_logs(capfd) as output_since:
        structlog.get_logger("gateway.auth").info("oops", credential="structlog-secret-1")
        logging.getLogger("aiohttp.server").error("oops %s", "stdlib-secret-2")
        logs.access_logger().info("request", path="/x?accesskey=access-secret-3")
        output = output_since()
    assert leaked(output, ["structlog-secret-1", "stdlib-secret-2", "access-secret-3"]) == [
        "access-secret-3",
        "stdlib-secret-2",
        "structlog-secret-1",
    ]


async def test_lookalike_identity_and_client_headers_are_removed(gw, upstream, client):
    spoofed = {
        "X_Gateway_Customer_Id": "evil",
        "x-gateway_team-id": "evil",
        "X_Real_IP": "6.6.6.6",
        "True-Client-IP": "6.6.6.6",
    }
    async with client.get(f"{gw.url}/echo/open/x", headers=spoofed) as resp:
        assert resp.status == 200
    names = {name.lower() for name, _ in upstream.last.headers}
    assert not names & {"x_gateway_customer_id", "x-gateway_team-id", "x_real_ip", "true-client-ip"}


async def test_hide_credentials_works_on_unauthenticated_routes(
    upstream, introspection, make_gateway, client
):
    gw = await make_gateway(
        upstream.url,
        routes=[{"name": "open", "prefix": "/", "auth": "none", "hide_credentials": True}],
        auth={"introspect": {"url": introspection.url}},
    )
    async with client.get(
        f"{gw.url}/echo/x?accesskey={KEY}&a=1", headers={"Authorization": "Bearer t"}
    ) as resp:
        assert resp.status == 200
    assert upstream.last.raw_path == "/echo/x?a=1"
    assert upstream.last.header("Authorization") is None


async def test_introspection_answer_in_several_pieces(upstream, make_gateway, client):
    async def me(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"customer_id": "cust-')
        await asyncio.sleep(0.05)  # the scenario: the body arrives in two writes
        await response.write(b'slow", "id": "a1"}')
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1.0/me", me)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1.0/me"
        gw = await make_gateway(upstream.url, routes=routes(), auth={"introspect": {"url": url}})
        async with client.get(f"{gw.url}/echo/x?accesskey=anything") as resp:
            assert resp.status == 200
        assert upstream.last.header("X-Gateway-Customer-Id") == "cust-slow"
    finally:
        await runner.cleanup()


# --- values that cannot be a credential, and the size limit -------------------------------------------


async def raw_exchange(port: int, target: bytes, extra_headers: bytes = b"") -> tuple[int, bytes]:
    """Send a request head as raw bytes (what aiohttp's client refuses to produce); (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" + extra_headers + b"\r\n"
        )
        async with asyncio.timeout(5):
            head, _, body = (await reader.read(-1)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    ("target", "extra_headers"),
    [
        (b"/echo/x?token=a.b.c%0D%0AX-Injected:%201", b""),
        (b"/echo/x?token=a%00b", b""),
        (b"/echo/x?accesskey=%FC", b""),
        (b"/echo/x?accesskey=a+b", b""),
        (b"/echo/x", b"Authorization: Bearer a.b\xfc.c\r\n"),
        (b"/echo/x", b"Cookie: accesskey=ab\xfccd\r\n"),
        (b"/echo/maybe/x", b'Cookie: token="a b"\r\n'),
    ],
    ids=["crlf", "nul", "latin1", "space", "header-non-ascii", "cookie-non-ascii", "optional-route"],
)
async def test_values_no_credential_can_have_are_401_before_any_lookup(
    gw, upstream, introspection, target, extra_headers
):
    status, body = await raw_exchange(gw.port, target, extra_headers)
    assert status == 401
    assert envelope_of(body)["reason"] == "INVALID_CREDENTIALS"
    assert introspection.calls == []
    assert upstream.requests == []


async def test_malformed_credential_challenge_is_invalid_token(gw, client):
    async with client.get(URL(f"{gw.url}/echo/x?token=a%00b", encoded=True)) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="voipbin", error="invalid_token"'


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"Authorization": "Bearer " + "a" * 12_000}, ""),
        ({"Cookie": "accesskey=" + "k" * 9_000}, ""),
    ],
    ids=["12kb-bearer", "9kb-cookie-key"],
)
async def test_oversized_credentials_never_reach_introspection(
    gw, upstream, introspection, client, headers, query
):
    async with client.get(f"{gw.url}/echo/x?{query}", headers=headers) as resp:
        assert resp.status == 401
        assert envelope_of(await resp.read())["reason"] == "INVALID_CREDENTIALS"
    assert introspection.calls == []
    assert upstream.requests == []


async def test_credential_size_limit_is_configurable(upstream, introspection, make_gateway, client):
    gw = await make_gateway(
        upstream.url,
        routes=routes(),
        auth={"introspect": {"url": introspection.url}, "max_credential_bytes": len(KEY) - 1},
    )
    async with client.get(f"{gw.url}/echo/x?accesskey={KEY}") as resp:
        assert resp.status == 401
    assert introspection.calls == []


async def test_switched_off_source_is_forwarded_untouched(upstream, introspection, make_gateway, client):
    gw = await make_gateway(
        upstream.url,
        routes=routes(),
        auth={"introspect": {"url": introspection.url}, "sources": {"query_token": False}},
    )
    # `token` means something else to this API: not a credential, not screened, not stripped
    target = "/echo/maybe/x?token=page%202%00"
    async with client.get(URL(gw.url + target, encoded=True)) as resp:
        assert resp.status == 200
    assert upstream.last.raw_path == target
    assert upstream.last.header("X-Gateway-Customer-Id") is None
    assert introspection.calls == []


# --- what the introspection endpoint answers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [(400, 401), (401, 401), (403, 401), (201, 200), (204, 503), (404, 503), (405, 503), (429, 503),
     (500, 503), (502, 503)],
)  # fmt: skip
async def test_introspection_status_means_refused_or_unavailable(gw, introspection, client, status, expected):
    introspection.answer = (status, json.dumps({"customer_id": "cust-x"}).encode() if status != 204 else b"")
    async with client.get(f"{gw.url}/echo/x?accesskey=some-key") as resp:
        assert resp.status == expected


async def test_introspection_does_not_follow_redirects(gw, introspection, client):
    introspection.mode = "redirect"
    async with client.get(f"{gw.url}/echo/x?accesskey={OTHER_KEY}") as resp:
        assert resp.status == 503


@pytest.mark.parametrize(
    "exp", [10**400, float("inf"), float("nan"), -(10**400), "2099-01-01 00:00:00", True, [1]]
)
async def test_absurd_expiry_in_an_accepted_token_is_no_cap(gw, upstream, introspection, client, exp):
    token = jwt.encode({"type": "agent", "exp": exp}, "secret-only-the-api-knows-0123456789", "HS256")
    introspection.answer = (200, json.dumps({"id": "agent-x", "customer_id": "cust-x"}).encode())
    for _ in range(2):
        async with client.get(f"{gw.url}/echo/x", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
    assert upstream.last.header("X-Gateway-Customer-Id") == "cust-x"
    assert len(introspection.calls) == 1  # cached for positive_ttl, as without any exp


@pytest.mark.parametrize(
    "answer",
    [
        {"customer_id": "cust\r\nX-Injected: 1", "id": "a1"},
        {"customer_id": "cust-x", "id": "a\x00"},
        {"customer_id": "cust-\u00fc", "id": "a1"},
        {"customer_id": {"id": "cust-x"}, "id": "a1"},
        {"customer_id": "cust-x", "team_id": ["t1"]},
    ],
    ids=["crlf", "nul", "non-ascii", "object", "list"],
)
async def test_unusable_identifier_in_an_answer_is_503_never_500(gw, upstream, introspection, client, answer):
    introspection.answer = (200, json.dumps(answer).encode())
    async with client.get(f"{gw.url}/echo/x?accesskey=some-key") as resp:
        assert resp.status == 503
        assert envelope_of(await resp.read())["reason"] == "SERVICE_UNAVAILABLE"
    assert upstream.requests == []


async def test_claim_requirement_reads_the_same_for_tokens_and_introspected_keys(gw, jwt_gw, client):
    # /me answers with the agent object that the API's tokens carry as `agent`
    async with client.get(f"{gw.url}/echo/admins/x?accesskey={KEY}") as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/echo/admins/x?accesskey={OTHER_KEY}") as resp:
        assert resp.status == 403
    admin = api_token(agent={"customer_id": "cust-jwt", "id": "agent-7", "permission": 32})
    async with client.get(
        f"{jwt_gw.url}/echo/admins/x", headers={"Authorization": f"Bearer {admin}"}
    ) as resp:
        assert resp.status == 200
    async with client.get(
        f"{jwt_gw.url}/echo/admins/x", headers={"Authorization": f"Bearer {api_token()}"}
    ) as resp:
        assert resp.status == 403


# --- JWKS and TLS ----------------------------------------------------------------------------------------


def self_signed_context(folder: Path) -> ssl.SSLContext:
    """A server context for 127.0.0.1 with a certificate nobody trusts."""
    key = rsa_key("tls").private
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def test_jwks_verifies_tls_even_when_the_upstream_does_not(
    upstream, make_gateway, client, tmp_path, monkeypatch
):
    jwks_requests: list[str] = []

    async def jwks(request: web.Request) -> web.Response:
        jwks_requests.append(request.path)
        return web.json_response({"keys": [rsa_key().jwk("k1", "RS256")]})

    async def me(_request: web.Request) -> web.Response:
        return web.json_response(IDENTITIES[KEY])

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    app.router.add_get("/v1.0/me", me)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self_signed_context(tmp_path)).start()
    sessions: list[aiohttp.ClientSession] = []
    real_factory = setup.jwks_session

    def recorded() -> aiohttp.ClientSession:
        sessions.append(real_factory())
        return sessions[-1]

    monkeypatch.setattr(setup, "jwks_session", recorded)
    base = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        gw = await make_gateway(
            upstream.url,
            routes=routes(),
            upstream={"tls_verify": False},  # e.g. an upstream with a private certificate
            auth={
                "jwt": {"keys": [{"algorithms": ["RS256"], "jwks_url": f"{base}/jwks"}]},
                "introspect": {"url": f"{base}/v1.0/me", "jwt": False},
            },
        )
        token = mint({"sub": "u1", "exp": 4102444800}, rsa_key(), "RS256", kid="k1")
        async with client.get(f"{gw.url}/echo/x", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 503  # the key set's certificate is not trusted: no key, no token
        assert jwks_requests == []
        # Introspection asks the upstream, so it follows upstream.tls_verify.
        async with client.get(f"{gw.url}/echo/x?accesskey={KEY}") as resp:
            assert resp.status == 200
        assert upstream.last.header("X-Gateway-Customer-Id") == "cust-1"
        await gw.server.stop()
        assert len(sessions) == 1 and sessions[0].closed
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "respelt", [AGENT_TOKEN + "=", AGENT_TOKEN + "==", AGENT_TOKEN.replace(".", "=.", 1)]
)
async def test_a_token_respelt_is_refused_before_introspection(gw, upstream, introspection, client, respelt):
    """One token, one spelling (RFC 7515 base64url, no padding), also for tokens only the upstream can
    verify: a padded copy must not reach it, nor the introspection cache under a key of its own."""
    async with client.get(f"{gw.url}/echo/x", headers={"Authorization": f"Bearer {respelt}"}) as resp:
        assert resp.status == 401
    assert introspection.calls == [] and upstream.requests == []
    async with client.get(f"{gw.url}/echo/x", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}) as resp:
        assert resp.status == 200
    assert introspection.calls == [AGENT_TOKEN]


# --- the gateway's own key prefix: decided by the gateway alone ---------------------------------------


def _near_copy(key: str) -> str:
    """One of our keys with its checksum broken: a typo, or a guess built from a leaked key."""
    return key[:-1] + ("0" if key[-1] != "0" else "1")


@pytest.mark.parametrize("stores", [["introspect"], ["file", "introspect"]])
async def test_a_key_with_our_prefix_is_never_introspected(
    upstream, introspection, make_gateway, client, tmp_path, monkeypatch, stores
):
    from test_access_keys import PEPPER, file_entry, keys_file

    from gateway.auth.access_keys import generate_key

    ours = generate_key("vbgw_")
    monkeypatch.setenv("TEST_PEPPER", PEPPER.decode())
    gw = await make_gateway(
        upstream.url,
        routes=routes(),
        auth={
            "introspect": {"url": introspection.url},
            "access_keys": {
                "stores": stores,
                "pepper_env": "TEST_PEPPER",
                "file": str(keys_file(tmp_path / "keys.yaml", [file_entry(ours)])),
            },
        },
    )
    for query, headers in (
        (f"accesskey={_near_copy(ours)}", {}),
        ("", {"Cookie": f"accesskey={_near_copy(ours)}"}),
        ("", {"Authorization": f"Bearer {_near_copy(ours)}"}),
        (f"accesskey={ours[:-3]}", {}),
        ("accesskey=vbgw_", {}),
    ):
        async with client.get(f"{gw.url}/echo/x?{query}", headers=headers) as resp:
            assert resp.status == 401, (query, headers)
            assert envelope_of(await resp.read())["reason"] == "INVALID_CREDENTIALS"
    assert introspection.calls == []  # not one near-copy went upstream
    assert upstream.requests == []
    async with client.get(f"{gw.url}/echo/x?accesskey={ours}") as resp:  # the real one: only its store knows
        assert resp.status == (200 if "file" in stores else 401)
    async with client.get(f"{gw.url}/echo/x?accesskey={KEY}") as resp:  # the API's own keys: introspected
        assert resp.status == 200
    assert introspection.calls == [KEY]
