"""`voipbin-gateway healthcheck` as a process, against real listeners on loopback.

The command under test runs as a subprocess (as Docker runs it) while the gateway it checks runs in this
test's event loop, so the subprocess is awaited, never waited for in a blocking call. Its configuration
comes from a file, $GATEWAY_CONFIG, GATEWAY_* variables or --admin-listen, exactly as `serve` reads it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from conftest import MakeGateway
from redis_server import free_port
from test_tls import Authority, Issued  # the TLS tests' PKI
from upstream_server import UpstreamServer

from gateway.config import ConfigError, TlsConfig, load_config
from gateway.healthcheck import Probe, configured_probe, dial_hosts, probe_for, status_of

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 30.0  # interpreter start and imports on a busy 2-core machine; the check itself is bounded


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def healthcheck(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run `python -m gateway healthcheck ARGS` with no GATEWAY_* variables but `env`'s."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "healthcheck", *args,
        env={**environ, **(env or {})}, cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"healthcheck {args} still running after {RUN_TIMEOUT}s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def config_file(tmp_path: Path, **raw: Any) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def assert_unhealthy(result: Result, *fragments: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == ""
    line = result.stderr.rstrip("\n")
    assert "\n" not in line and line.startswith("unhealthy: "), result.stderr
    for fragment in fragments:
        assert fragment in line, result.stderr


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    return free_port()


# --- a real gateway ------------------------------------------------------------------------------------


async def test_a_running_gateway_is_healthy(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(upstream.url)
    port = gw.server.admin_address[1]
    result = await healthcheck("--config", str(config_file(tmp_path, admin_listen=f"127.0.0.1:{port}")))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


async def test_a_wildcard_admin_listener_is_dialled_on_ipv4_loopback(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    """The config says 0.0.0.0, as the image's does; the gateway listens on 127.0.0.1 only. (Linux would also
    take a connect to 0.0.0.0 as one to the local host: test_dial_hosts pins the address actually dialled.)"""
    gw = await make_gateway(upstream.url)
    port = gw.server.admin_address[1]
    result = await healthcheck("--config", str(config_file(tmp_path, admin_listen=f"0.0.0.0:{port}")))
    assert result.returncode == 0, result


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_a_wildcard_ipv6_admin_listener_is_dialled_on_ipv6_loopback(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(upstream.url, admin_listen="[::1]:0")
    port = gw.server.admin_address[1]
    result = await healthcheck("--config", str(config_file(tmp_path, admin_listen=f"[::]:{port}")))
    assert result.returncode == 0, result
    # The same port on IPv4 loopback has no listener: the family was kept.
    result = await healthcheck("--config", str(config_file(tmp_path, admin_listen=f"0.0.0.0:{port}")))
    assert_unhealthy(result, f"http://127.0.0.1:{port}/healthz")


async def test_admin_listen_comes_from_the_environment_as_for_serve(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(upstream.url)
    port = gw.server.admin_address[1]
    stale = config_file(tmp_path, admin_listen=f"127.0.0.1:{closed_port()}")
    # GATEWAY_CONFIG names the file and GATEWAY_ADMIN_LISTEN beats it, as `serve` reads them.
    env = {"GATEWAY_CONFIG": str(stale), "GATEWAY_ADMIN_LISTEN": f"0.0.0.0:{port}"}
    assert (await healthcheck(env=env)).returncode == 0
    # Without the override the file's (closed) port is the one checked: the file was read.
    assert_unhealthy(await healthcheck(env={"GATEWAY_CONFIG": str(stale)}))
    # --admin-listen, for a gateway started with `serve --admin-listen`, beats both.
    result = await healthcheck("--admin-listen", f"127.0.0.1:{port}", env={"GATEWAY_CONFIG": str(stale)})
    assert result.returncode == 0, result


async def test_a_config_the_gateway_refuses_does_not_fail_its_check(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    """A running gateway refuses a bad config on reload and keeps serving the one it has; the check must
    not fail it over keys the check does not use (an exec liveness probe would restart it into a failing
    start)."""
    gw = await make_gateway(upstream.url)
    port = gw.server.admin_address[1]
    refused = config_file(
        tmp_path,
        admin_listen=f"127.0.0.1:{port}",
        # Wrong for serve, beside the two keys the check takes from admin_tls (cert_file unset: plain http).
        admin_tls={"min_version": "1.0", "client_ca_file": "/nowhere/ca.pem", "no_such_key": 1},
        upstream={"url": "ftp://upstream"},
        no_such_section={},
    )
    with pytest.raises(ConfigError):  # the premise: serve, check-config and a reload refuse this file
        load_config(refused, environ={})
    env = {"GATEWAY_UPSTREAM_URL": "ftp://elsewhere", "GATEWAY_NO_SUCH_KEY": "1"}
    result = await healthcheck("--config", str(refused), env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


async def test_a_draining_gateway_is_still_alive(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway
) -> None:
    """Liveness, not readiness: a drain (SIGTERM) must not look like a hung process to Docker."""
    gw = await make_gateway(upstream.url)
    assert gw.server.gateway is not None
    gw.server.gateway.admission.draining = True
    port = gw.server.admin_address[1]
    result = await healthcheck("--admin-listen", f"127.0.0.1:{port}", "--config", str(config_file(tmp_path)))
    assert result.returncode == 0, result


# --- what is not healthy -------------------------------------------------------------------------------


async def test_nothing_listening_is_unhealthy_with_the_reason(tmp_path: Path) -> None:
    port = closed_port()
    result = await healthcheck("--config", str(config_file(tmp_path, admin_listen=f"0.0.0.0:{port}")))
    assert_unhealthy(result, f"http://127.0.0.1:{port}/healthz", "refused")


@pytest.fixture
async def admin_stub() -> AsyncIterator[Callable[[web.Response], Any]]:
    """stub(response) → the port of a real HTTP server answering every /healthz with that response."""
    runners: list[web.AppRunner] = []

    async def start(response: web.Response) -> int:
        async def healthz(request: web.Request) -> web.Response:
            return response

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("status", [503, 404, 301, 204])
async def test_any_answer_but_200_is_unhealthy(
    tmp_path: Path, admin_stub: Callable[[web.Response], Any], status: int
) -> None:
    port = await admin_stub(web.Response(status=status))
    result = await healthcheck("--admin-listen", f"127.0.0.1:{port}", "--config", str(config_file(tmp_path)))
    assert_unhealthy(result, f"answered {status}")


async def test_a_listener_that_never_answers_is_unhealthy_within_the_timeout(tmp_path: Path) -> None:
    # Listening but never accepting: the kernel completes the handshake and queues the request, and no
    # answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        result = await healthcheck(
            "--admin-listen", f"127.0.0.1:{port}", "--timeout", "0.5", "--config", str(config_file(tmp_path))
        )
    assert_unhealthy(result, "no answer within 0.5s")


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def check_raw_listener(tmp_path: Path, behave: Behaviour) -> Result:
    """Run the check against a TCP listener that reads the request head, then does `behave` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Read first: closing with the request unread would make the kernel send a reset, not a close.
            await reader.readuntil(b"\r\n\r\n")
            await behave(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        return await healthcheck(
            "--admin-listen", f"127.0.0.1:{port}", "--config", str(config_file(tmp_path))
        )


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"-ERR unknown command\r\n", "not HTTP/1.x"),  # a Redis, say, where the admin listener was expected
        (b"", "closed without an answer"),
        # Over asyncio's 64 KiB stream limit without a line end.
        (b"x" * 70 * 1024, "not HTTP/1.x"),
    ],
    ids=["redis", "nothing", "endless-line"],
)
async def test_an_answer_that_is_not_http_is_unhealthy(tmp_path: Path, answer: bytes, reason: str) -> None:
    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    assert_unhealthy(await check_raw_listener(tmp_path, answer_and_close), reason)


async def test_a_reset_before_any_answer_is_a_close_without_one(tmp_path: Path) -> None:
    """What a peer that closes with the request unread sends, depending on timing, instead of a close."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # SO_LINGER on with 0 s: the close that follows sends a reset.
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)

    assert_unhealthy(await check_raw_listener(tmp_path, reset), "closed without an answer")


@pytest.mark.parametrize(
    ("raw", "env", "args", "said"),
    [
        (
            {"admin_listen": "nowhere"},
            {},
            (),
            ["config: admin_listen = 'nowhere' (from config file {file})", "HOST:PORT"],
        ),
        (
            {},
            {"GATEWAY_ADMIN_TLS_CLIENT_AUTH": "sometimes"},
            (),
            [
                "config: admin_tls.client_auth = 'sometimes' (from GATEWAY_ADMIN_TLS_CLIENT_AUTH)",
                "'required'",
            ],
        ),
        ({}, {}, ("--admin-listen", "[::1]"), ["config: admin_listen = '[::1]' (from --admin-listen)"]),
        ("admin_listen: [\n  x: y\n", {}, (), ["config: config file {file}: not valid YAML"]),
    ],
    ids=["file", "environment", "flag", "not-yaml"],
)
async def test_invalid_keys_the_check_needs_are_one_line_naming_the_key(
    tmp_path: Path, raw: dict[str, Any] | str, env: dict[str, str], args: tuple[str, ...], said: list[str]
) -> None:
    if isinstance(raw, str):
        file = tmp_path / "gateway.yaml"
        file.write_text(raw, encoding="utf-8")
    else:
        file = config_file(tmp_path, **raw)
    result = await healthcheck("--config", str(file), *args, env=env)
    assert_unhealthy(result, *(fragment.format(file=file) for fragment in said))


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
async def test_timeout_must_be_positive_seconds(value: str) -> None:
    result = await healthcheck("--timeout", value)
    assert result.returncode == 2  # argparse's usage error
    assert "positive number of seconds" in result.stderr, result.stderr


# --- admin_tls -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdminPki:
    server: Issued  # from a CA the healthcheck is never given: the chain is not verified
    client_ca: Authority
    probe: Issued  # a client certificate the admin listener trusts
    intruder: Issued  # one from another CA


@pytest.fixture(scope="module")
def admin_pki(tmp_path_factory: pytest.TempPathFactory) -> AdminPki:
    folder = tmp_path_factory.mktemp("admin-pki")
    server_ca, client_ca, other_ca = (Authority(folder, name) for name in ("admin", "probes", "other"))
    return AdminPki(
        server=server_ca.issue("admin"),
        client_ca=client_ca,
        probe=client_ca.issue("probe", client=True),
        intruder=other_ca.issue("intruder", client=True),
    )


def admin_tls(pki: AdminPki, client_auth: str = "none") -> dict[str, Any]:
    section = {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key), "client_auth": client_auth}
    if client_auth != "none":
        section["client_ca_file"] = str(pki.client_ca.pem)
    return section


async def test_an_admin_listener_with_tls_is_checked_over_https(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway, admin_pki: AdminPki
) -> None:
    gw = await make_gateway(upstream.url, admin_tls=admin_tls(admin_pki))
    admin_listen = f"0.0.0.0:{gw.server.admin_address[1]}"
    config = config_file(tmp_path, admin_listen=admin_listen, admin_tls=admin_tls(admin_pki))
    result = await healthcheck("--config", str(config))
    assert (result.returncode, result.stderr) == (0, "")
    # The same listener asked in plain HTTP does not answer 200: it was https that worked.
    assert_unhealthy(await healthcheck("--admin-listen", admin_listen), "http://127.0.0.1:")


async def test_a_required_client_certificate_is_said_so_or_presented(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway, admin_pki: AdminPki
) -> None:
    gw = await make_gateway(upstream.url, admin_tls=admin_tls(admin_pki, "required"))
    port = gw.server.admin_address[1]
    config = str(
        config_file(tmp_path, admin_listen=f"0.0.0.0:{port}", admin_tls=admin_tls(admin_pki, "required"))
    )

    without = await healthcheck("--config", config)
    assert_unhealthy(
        without, f"https://127.0.0.1:{port}/healthz", "admin_tls.client_auth is required", "--cert"
    )

    probe = admin_pki.probe
    result = await healthcheck("--config", config, "--cert", str(probe.cert), "--key", str(probe.key))
    assert (result.returncode, result.stderr) == (0, "")

    intruder = admin_pki.intruder
    refused = await healthcheck("--config", config, "--cert", str(intruder.cert), "--key", str(intruder.key))
    assert_unhealthy(refused, f"https://127.0.0.1:{port}/healthz")

    missing = await healthcheck("--config", config, "--cert", str(tmp_path / "none.pem"))
    assert_unhealthy(missing, "cannot load --cert")


async def test_an_optional_client_certificate_needs_none(
    tmp_path: Path, upstream: UpstreamServer, make_gateway: MakeGateway, admin_pki: AdminPki
) -> None:
    gw = await make_gateway(upstream.url, admin_tls=admin_tls(admin_pki, "optional"))
    port = gw.server.admin_address[1]
    config = config_file(
        tmp_path, admin_listen=f"127.0.0.1:{port}", admin_tls=admin_tls(admin_pki, "optional")
    )
    result = await healthcheck("--config", str(config))
    assert (result.returncode, result.stderr) == (0, "")


# --- pure parts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen_host", "dialled"),
    [
        ("0.0.0.0", ("127.0.0.1",)),
        # A dual-stack [::] listener also answers on 127.0.0.1, the way in where ::1 does not exist.
        ("::", ("::1", "127.0.0.1")),
        ("0:0:0:0:0:0:0:0", ("::1", "127.0.0.1")),
        ("127.0.0.1", ("127.0.0.1",)),
        ("10.1.2.3", ("10.1.2.3",)),
        ("::1", ("::1",)),
        ("fd00::5", ("fd00::5",)),
        ("localhost", ("localhost",)),
    ],
)
def test_dial_hosts(listen_host: str, dialled: tuple[str, ...]) -> None:
    assert dial_hosts(listen_host) == dialled


@pytest.mark.parametrize(
    ("admin_listen", "url"),
    [
        ("0.0.0.0:9102", "http://127.0.0.1:9102/healthz"),
        ("[::]:9102", "http://[::1]:9102/healthz"),
        ("[fd00::5]:9000", "http://[fd00::5]:9000/healthz"),
        ("localhost:9102", "http://localhost:9102/healthz"),
    ],
)
def test_probe_follows_admin_listen(admin_listen: str, url: str) -> None:
    probe = probe_for(admin_listen, TlsConfig())
    assert probe.url == url
    assert not probe.tls


@pytest.mark.parametrize(
    ("client_auth", "required"), [("none", False), ("optional", False), ("required", True)]
)
def test_probe_follows_admin_tls(client_auth: str, required: bool) -> None:
    section = {"cert_file": "/certs/admin.pem", "key_file": "/certs/admin.key", "client_auth": client_auth}
    if client_auth != "none":
        section["client_ca_file"] = "/certs/probes-ca.pem"
    probe = probe_for("0.0.0.0:9102", TlsConfig.model_validate(section))
    assert probe.url == "https://127.0.0.1:9102/healthz"
    assert probe.client_cert_required is required


def test_configured_probe_takes_serves_sources_in_its_order(tmp_path: Path) -> None:
    file = str(
        config_file(
            tmp_path,
            admin_listen="10.0.0.1:1",
            admin_tls={"cert_file": "/certs/admin.pem", "client_auth": "optional"},
            tls={"cert_file": "/certs/api.pem", "client_auth": "required"},  # the client listener's: not used
        )
    )
    https = {"tls": True, "client_cert_required": False}
    assert configured_probe(file, environ={}, admin_listen=None) == Probe(("10.0.0.1",), 1, **https)
    assert configured_probe(None, environ={"GATEWAY_CONFIG": file}, admin_listen=None) == Probe(
        ("10.0.0.1",), 1, **https
    )
    env = {
        "GATEWAY_CONFIG": file,
        "GATEWAY_ADMIN_LISTEN": "10.0.0.2:2",
        "GATEWAY_ADMIN_TLS_CLIENT_AUTH": "required",
    }
    assert configured_probe(None, environ=env, admin_listen=None) == Probe(
        ("10.0.0.2",), 2, tls=True, client_cert_required=True
    )
    assert configured_probe(None, environ=env, admin_listen="10.0.0.3:3").port == 3
    # --config beats $GATEWAY_CONFIG; nothing set anywhere is serve's defaults.
    assert configured_probe(str(config_file(tmp_path)), environ=env, admin_listen=None).hosts == ("10.0.0.2",)
    assert configured_probe(None, environ={}, admin_listen=None) == Probe(
        ("127.0.0.1",), 9102, tls=False, client_cert_required=False
    )


def test_configured_probe_validates_only_the_keys_it_uses(tmp_path: Path) -> None:
    file = str(
        config_file(
            tmp_path,
            admin_listen="127.0.0.1:9",
            admin_tls={"cert_file": "/certs/admin.pem", "ciphers": "NONE-SUCH", "min_version": 1.0},
            routes="not a list",
            metrics={"no_such_key": True},
        )
    )
    env = {"GATEWAY_UPSTREAM_URL": "ftp://x", "GATEWAY_ADMIN_TLS_KEY_FILE": "", "GATEWAY_NOT_A_KEY": "1"}
    assert configured_probe(file, environ=env, admin_listen=None) == Probe(
        ("127.0.0.1",), 9, tls=True, client_cert_required=False
    )
    bad = str(config_file(tmp_path, admin_listen=9102, admin_tls={"cert_file": "", "client_auth": "yes"}))
    with pytest.raises(ConfigError) as raised:
        configured_probe(bad, environ={}, admin_listen=None)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"admin_listen = 9102 (from config file {bad}): "), message
    assert f"; admin_tls.cert_file = '' (from config file {bad}): " in message, message
    assert f"; admin_tls.client_auth = 'yes' (from config file {bad}): " in message, message
    not_a_section = str(config_file(tmp_path, admin_tls="yes"))
    with pytest.raises(ConfigError, match=r"^admin_tls = 'yes' \(from config file .*\): must be a mapping"):
        configured_probe(not_a_section, environ={}, admin_listen=None)


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 503 Service Unavailable\r\n", 503),
        (b"HTTP/1.1 200\r\n", 200),
        (b"HTTP/1.1 200 OK\n", 200),
        (b"HTTP/2 200\r\n", None),
        (b"HTTP/1.1 20 OK\r\n", None),
        (b"-ERR unknown command\r\n", None),
        (b"HTTP/1.1 200 OK", None),  # cut off before the line ended
        (b"", None),
    ],
)
def test_status_of(line: bytes, status: int | None) -> None:
    assert status_of(line) == status


def test_probe_url_brackets_ipv6_and_its_target_names_the_fallback() -> None:
    probe = Probe(("::1", "127.0.0.1"), 1, tls=True, client_cert_required=False)
    assert probe.url == "https://[::1]:1/healthz"
    assert probe.target == "https://[::1]:1/healthz (or 127.0.0.1)"
