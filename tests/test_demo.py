"""The newcomer demo as the README runs it: `voipbin-gateway demo` as a real process (stand-in upstream
and gateway on free loopback ports), tokens minted with `voipbin-gateway demo token`, requests through the
gateway.

Readiness is polled, every wait and loop is bounded, and every process is killed by its process group in the
fixture's teardown (tests/test_lifecycle.py's helpers do the spawning chores).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from multidict import CIMultiDict
from redis_server import free_ports
from test_lifecycle import (
    LOOPBACK,
    ROOT,
    START_TIMEOUT,
    CliResult,
    GatewayProcess,
    follow_output,
    poll,
    reap,
    run_cli,
)

from gateway.auth.identity import identity_from_claims
from gateway.config import GatewayConfig, JwtKey, load_config
from gateway.demo import command, data
from gateway.demo.token import agent_claims, mint

DEMO_CONFIG = ROOT / "config" / "demo.yaml"
DEMO_ACCESS_KEY = (ROOT / "config" / "demo" / "accesskey.txt").read_text(encoding="utf-8").strip()
BURST = 5  # config/demo.yaml: rate_limit.policies.customer.burst
MAX_REQUESTS_TO_429 = 20  # after the burst, one request per 10 s refills: far fewer unless the box stalls
STOP_WITHIN = 15.0  # SIGINT with nothing in flight: the drain is immediate, then the stand-in stops


@dataclass
class DemoProcess(GatewayProcess):
    upstream_port: int = 0

    @property
    def upstream_url(self) -> str:
        return f"http://{LOOPBACK}:{self.upstream_port}"


StartDemo = Callable[..., Awaitable[DemoProcess]]


@pytest.fixture
async def demo() -> AsyncIterator[StartDemo]:
    """demo(*extra_args) → a started `voipbin-gateway demo` on free ports (not yet known ready)."""
    started: list[DemoProcess] = []

    async def factory(*extra: str) -> DemoProcess:
        port, admin_port, upstream_port = free_ports(3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "demo",
            "--listen", f"{LOOPBACK}:{port}", "--admin-listen", f"{LOOPBACK}:{admin_port}",
            "--upstream-listen", f"{LOOPBACK}:{upstream_port}", *extra,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        gw = DemoProcess(proc, port, admin_port, upstream_port=upstream_port)
        started.append(follow_output(gw))
        return gw

    try:
        yield factory
    finally:
        await reap(started)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def demo_cli(*args: str) -> CliResult:
    """`voipbin-gateway demo ...` to completion, off the event loop that reads the demo's output."""
    return await asyncio.to_thread(run_cli, "demo", *args)


async def mint_token(*args: str) -> str:
    result = await demo_cli("token", *args)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout.strip()


async def get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, CIMultiDict[str], Any]:
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


async def wait_ready(gw: GatewayProcess, session: aiohttp.ClientSession) -> dict[str, Any]:
    await gw.wait_healthy(session)
    answers: list[tuple[int, Any]] = []

    async def ready() -> bool:
        status, _, body = await get(session, f"{gw.admin_url}/readyz")
        answers.append((status, body))
        return status == 200

    try:
        await poll(ready, within=START_TIMEOUT, what="/readyz 200", interval=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answers {answers[-3:]}\n{gw.output()}") from None
    return answers[-1][1]


def assert_envelope(body: Any, headers: CIMultiDict[str], status: str, reason: str) -> None:
    error = body["error"]
    assert (error["status"], error["reason"]) == (status, reason), body
    assert error["message"]
    assert error["request_id"] == headers["X-Request-ID"]


# ------------------------------------------------------------------------------- the README's requests


@pytest.mark.slow
async def test_first_requests_as_the_readme_shows_them(
    demo: StartDemo, session: aiohttp.ClientSession
) -> None:
    gw = await demo()
    readyz = await wait_ready(gw, session)
    assert readyz == {"status": "ready", "checks": {"config": "ok", "upstream": "ok"}}
    token = await mint_token()
    bearer = {"Authorization": f"Bearer {token}"}

    # One request that succeeds: the stand-in's answer, with the customer policy's figures.
    status, headers, body = await get(session, f"{gw.url}/v1.0/calls", **bearer)
    assert status == 200, body
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == (str(BURST), str(BURST - 1))
    assert headers["X-RateLimit-Reset"].isdigit()
    assert [call["id"] for call in body["result"]] == list(data.CALLS)
    assert {call["customer_id"] for call in body["result"]} == {data.DEMO_CUSTOMER_ID}
    assert body["next_page_token"] == ""

    # One refused without a credential, by the gateway itself.
    status, headers, body = await get(session, f"{gw.url}/v1.0/calls")
    assert status == 401
    assert_envelope(body, headers, "UNAUTHENTICATED", "AUTHENTICATION_REQUIRED")
    assert headers["WWW-Authenticate"] == 'Bearer realm="voipbin"'

    # The loop that ends in 429: what the first request left of the burst passes, whatever the timing.
    statuses: list[int] = []
    for _ in range(MAX_REQUESTS_TO_429):
        status, headers, body = await get(session, f"{gw.url}/v1.0/calls", **bearer)
        statuses.append(status)
        if status != 200:
            break
    assert statuses[-1] == 429, statuses
    assert statuses[: BURST - 1] == [200] * (BURST - 1), statuses
    assert_envelope(body, headers, "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED")
    assert body["error"]["details"] == [{"limited_by": "customer", "policy": "customer"}]
    assert headers["Retry-After"].isdigit() and int(headers["Retry-After"]) >= 1, headers
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == (str(BURST), "0")

    # Ctrl-C stops both: the gateway drains, the stand-in stops after it, exit 0.
    gw.proc.send_signal(signal.SIGINT)
    assert await gw.wait_exit(STOP_WITHIN) == 0, gw.output()
    assert token not in gw.output()
    with socket.create_server((LOOPBACK, gw.upstream_port)):
        pass  # the stand-in's port is free again


@pytest.mark.slow
async def test_token_and_access_key_identities_reach_the_stand_in(
    demo: StartDemo, session: aiohttp.ClientSession
) -> None:
    gw = await demo()
    await wait_ready(gw, session)

    token = await mint_token("--customer", "cust-42", "--team", "team-7", "--expires", "15m")
    status, _, me = await get(session, f"{gw.url}/v1.0/me", Authorization=f"Bearer {token}")
    assert (status, me["id"], me["customer_id"]) == (200, data.DEMO_AGENT_ID, "cust-42"), me

    known = next(iter(data.CALLS))
    status, _, call = await get(session, f"{gw.url}/v1.0/calls/{known}", Authorization=f"Bearer {token}")
    assert (status, call["id"], call["customer_id"]) == (200, known, "cust-42"), call
    unknown = "00000000-0000-4000-8000-000000000000"
    status, headers, body = await get(
        session, f"{gw.url}/v1.0/calls/{unknown}", Authorization=f"Bearer {token}"
    )
    assert status == 404
    assert_envelope(body, headers, "NOT_FOUND", "CALL_NOT_FOUND")

    status, _, me = await get(session, f"{gw.url}/v1.0/me?accesskey={DEMO_ACCESS_KEY}")
    assert (status, me["customer_id"]) == (200, data.DEMO_CUSTOMER_ID), me

    # A token the demo secret did not sign is refused by the gateway, never passed on to the stand-in.
    forged = jwt.encode(agent_claims("cust-42", None, now=0, lifetime=2**40), "x" * 32, algorithm="HS256")
    status, headers, body = await get(session, f"{gw.url}/v1.0/me", Authorization=f"Bearer {forged}")
    assert status == 401
    assert_envelope(body, headers, "UNAUTHENTICATED", "INVALID_CREDENTIALS")

    # The stand-in itself answers only what carries the gateway's identity headers.
    status, _, body = await get(session, f"{gw.upstream_url}/v1.0/calls", Authorization=f"Bearer {token}")
    assert (status, body["error"]["reason"]) == (401, "AUTHENTICATION_REQUIRED"), body


# ------------------------------------------------------------------------------------------ the CLI


def test_check_config_accepts_the_demo_config() -> None:
    result = run_cli("check-config", "--config", str(DEMO_CONFIG.relative_to(ROOT)))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", ""), result


async def test_demo_stops_at_once_when_the_stand_in_port_is_taken() -> None:
    port, admin_port = free_ports(2)
    with socket.create_server((LOOPBACK, 0)) as taken:
        upstream_port = taken.getsockname()[1]
        result = await demo_cli(
            "--listen", f"{LOOPBACK}:{port}", "--admin-listen", f"{LOOPBACK}:{admin_port}",
            "--upstream-listen", f"{LOOPBACK}:{upstream_port}",
        )  # fmt: skip
    assert result.returncode == 3, result
    assert f"cannot listen on {LOOPBACK}:{upstream_port}" in result.stderr, result


async def test_demo_without_its_config_says_where_to_run_it() -> None:
    for args, code in ((("--config", "no/such.yaml"), 2), (("token", "--config", "no/such.yaml"), 1)):
        result = await demo_cli(*args)
        assert result.returncode == code, result
        assert (
            result.stderr
            == "error: no file no/such.yaml: run this in the repository root, or pass --config\n"
        )


async def test_demo_token_refuses_a_bad_lifetime_naming_the_option() -> None:
    result = await demo_cli("token", "--expires", "soon")
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr.startswith("error: --expires: invalid duration 'soon'"), result


@pytest.mark.parametrize(
    ("argv", "config"),
    [
        (["demo", "token"], "config/demo.yaml"),
        (["demo", "--config", "a.yaml", "token"], "a.yaml"),
        (["demo", "token", "--config", "b.yaml"], "b.yaml"),
        (["demo", "--config", "a.yaml"], "a.yaml"),
    ],
)
def test_config_option_before_or_after_token(argv: list[str], config: str) -> None:
    parser = argparse.ArgumentParser()
    command.add_commands(parser.add_subparsers(dest="command"))
    assert parser.parse_args(argv).config == config


def test_only_the_cli_entry_imports_the_demo() -> None:
    """The demo is no part of the gateway: nothing but the CLI entry may depend on it."""
    package = ROOT / "gateway"
    importers = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if "gateway.demo" in path.read_text(encoding="utf-8") and path.parent.name != "demo"
    }
    assert importers == {"cli.py"}


# ------------------------------------------------------------------------- the token, without sockets


def test_demo_token_claims_map_to_the_identity_the_demo_config_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # config/demo.yaml's secret paths are relative, as the README runs them
    config = load_config(DEMO_CONFIG)
    claims = agent_claims("cust-1", "team-a", now=1_000, lifetime=60)
    decoded = jwt.decode(
        mint(config, claims, environ={}),
        (ROOT / "config" / "demo" / "jwt-secret.txt").read_bytes().rstrip(b"\n"),
        algorithms=["HS256"],
        options={"verify_exp": False},
    )
    identity = identity_from_claims(decoded, config.auth.jwt.claims, default_type="jwt", expires_at=None)
    assert (identity.credential_type, identity.customer_id, identity.team_id, identity.credential_id) == (
        "agent",
        "cust-1",
        "team-a",
        data.DEMO_AGENT_ID,
    )
    assert (decoded["iat"], decoded["exp"]) == (1_000, 1_060)


def test_mint_signs_with_the_configured_secret_and_names_its_kid() -> None:
    key = JwtKey(kid="2026-01", algorithms=("HS384",), secret_env="DEMO_TEST_SECRET")
    config = GatewayConfig.model_validate({"auth": {"jwt": {"keys": [key.model_dump()]}}})
    token = mint(config, {"sub": "x"}, environ={"DEMO_TEST_SECRET": "s" * 48})
    assert jwt.get_unverified_header(token) == {"alg": "HS384", "kid": "2026-01", "typ": "JWT"}
    assert jwt.decode(token, "s" * 48, algorithms=["HS384"]) == {"sub": "x"}


def test_mint_without_a_shared_secret_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match=r"auth\.jwt\.keys has no key with secret_env or secret_file"):
        mint(GatewayConfig(), {"sub": "x"})
