"""TLS (gateway/tls.py): the client and admin listeners, client certificates, TLS to the upstream, certificate
renewal on a running gateway, and unusable files reported by key.

Real TLS clients on loopback: Python's ssl (asyncio streams, aiohttp) and the `openssl s_client` and `curl`
binaries, run as subprocesses with a deadline each. Certificates come from test authorities generated once
per module (EC P-256, quick to make).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import re
import shutil
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import structlog
import yaml
from aiohttp import WSMsgType, web
from conftest import RunningGateway
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import cli, tls
from gateway.config import TLS_CIPHERS, ConfigError, GatewayConfig, TlsConfig, UpstreamConfig, load_config
from gateway.server import GatewayServer

IO_TIMEOUT = 20.0  # one TLS exchange on a busy 2-core box, generously
PROCESS_TIMEOUT = 30.0  # one openssl or curl run, start-up included
ACCESS_KEY = "tls-test-access-key-0001"


# --- a test PKI ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path

    @property
    def fingerprint(self) -> str:
        return der_fingerprint(ssl.PEM_cert_to_DER_cert(self.cert.read_text()))


class Authority:
    """A CA that signs server certificates (for 127.0.0.1 and localhost) and client certificates."""

    def __init__(self, folder: Path, name: str) -> None:
        self._folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            _builder(self.name, self.name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = folder / f"{name}-ca.pem"
        self.pem.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, client: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(subject, self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if not client:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self._folder / f"{common_name}.pem", self._folder / f"{common_name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return issued


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
    )


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Pki:
    ca: Authority  # the gateway's server certificates
    server_a: Issued
    server_b: Issued
    client_ca: Authority
    client: Issued
    other_ca: Authority  # nobody trusts it
    intruder: Issued  # a client certificate from other_ca
    upstream_ca: Authority
    upstream: Issued
    gateway_client: Issued  # what the gateway shows an upstream that wants a client certificate (client_ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, client_ca, other_ca, upstream_ca = (
        Authority(folder, name) for name in ("gateway", "clients", "other", "upstreams")
    )
    return Pki(
        ca=ca,
        server_a=ca.issue("gateway-a"),
        server_b=ca.issue("gateway-b"),
        client_ca=client_ca,
        client=client_ca.issue("client-1", client=True),
        other_ca=other_ca,
        intruder=other_ca.issue("intruder", client=True),
        upstream_ca=upstream_ca,
        upstream=upstream_ca.issue("upstream"),
        gateway_client=client_ca.issue("gateway-as-client", client=True),
    )


def listener(issued: Issued, **extra: Any) -> dict[str, Any]:
    return {"cert_file": str(issued.cert), "key_file": str(issued.key), **extra}


def mtls(pki: Pki, client_auth: str = "required") -> dict[str, Any]:
    return listener(pki.server_a, client_ca_file=str(pki.client_ca.pem), client_auth=client_auth)


def client_context(pki: Pki, cert: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca.pem)
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


def https(gw: RunningGateway, path: str = "/echo") -> str:
    return f"https://127.0.0.1:{gw.port}{path}"


# --- clients -----------------------------------------------------------------------------------------------


class Connection:
    """One client TLS connection (asyncio streams), kept alive across requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ssl: ssl.SSLObject = writer.get_extra_info("ssl_object")

    @property
    def fingerprint(self) -> str:
        der = self.ssl.getpeercert(binary_form=True)
        assert der is not None
        return der_fingerprint(der)

    async def get(self, path: str = "/echo") -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode())
        async with asyncio.timeout(IO_TIMEOUT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert length is not None, head
            body = await self.reader.readexactly(int(length[1]))
        return int(head.split(b" ", 2)[1]), body


Connect = Callable[..., Awaitable[Connection]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """connect(port, context, server_hostname=None) → a Connection, closed at teardown."""
    opened: list[Connection] = []

    async def factory(port: int, context: ssl.SSLContext, server_hostname: str | None = None) -> Connection:
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=server_hostname
            )
        opened.append(Connection(reader, writer))
        return opened[-1]

    yield factory
    for connection in opened:
        connection.writer.close()


async def handshake_refused(connect: Connect, port: int, context: ssl.SSLContext) -> None:
    """The gateway ends the handshake: with an alert, or (asyncio drops it) just by closing."""
    with pytest.raises(OSError) as refusal:  # ssl.SSLError, ConnectionResetError
        await connect(port, context)
    # Not the client's own refusal to offer what it was set up with: the handshake reached the gateway.
    assert getattr(refusal.value, "reason", None) not in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE")


async def refused(connect: Connect, port: int, context: ssl.SSLContext) -> bool:
    """Whether the gateway refuses this client: at the handshake, or (TLS 1.3, where a client certificate is
    judged after the client finished its handshake) with an alert instead of the first response."""
    try:
        connection = await connect(port, context)
        await connection.get()
    except (OSError, asyncio.IncompleteReadError):  # ssl.SSLError is an OSError
        return True
    return False


async def run(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(PROCESS_TIMEOUT):
            out, err = await process.communicate(stdin)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def curl(url: str, ca: Path, *extra: str) -> tuple[int, bytes]:
    """(HTTP status, 0 when there was none; body)."""
    code, out, _ = await run(
        "curl", "-sS", "--max-time", str(PROCESS_TIMEOUT - 5), "--cacert", str(ca), "-w", "\n%{http_code}",
        *extra, url,
    )  # fmt: skip
    body, _, status = out.rpartition("\n")
    assert (code == 0) == (status != "000"), (code, out)
    return int(status), body.encode()


@dataclass(frozen=True)
class SClient:
    fingerprint: str | None
    """Of the certificate the server sent; None when there was none."""
    output: str

    @property
    def status(self) -> int:
        """The response's HTTP status; 0 when there was none."""
        # Not anchored: s_client prints session tickets as they come, into the middle of a line.
        found = re.search(r"HTTP/1\.1 (\d{3}) ", self.output)
        return int(found[1]) if found else 0


async def s_client(port: int, ca: Path, *extra: str, path: str = "/echo") -> SClient:
    """`openssl s_client` sending one request (Connection: close) and reading until the gateway closes."""
    request = f"GET {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n".encode()
    _, out, err = await run(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca), "-verify_return_error",
        "-ign_eof", *extra, stdin=request,
    )  # fmt: skip
    pem = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out, re.S)
    return SClient(der_fingerprint(ssl.PEM_cert_to_DER_cert(pem[0])) if pem else None, out + err)


@pytest.fixture(autouse=True)
def _binaries() -> None:
    for binary in ("openssl", "curl"):
        assert shutil.which(binary), f"{binary} is needed by these tests"


# --- the client listener -----------------------------------------------------------------------------------


async def test_https_through_the_gateway_to_a_plain_upstream(upstream, make_gateway, client, pki):
    gw = await make_gateway(upstream.url, tls=listener(pki.server_a))
    async with client.get(https(gw, "/echo/x?q=1"), ssl=client_context(pki)) as resp:
        assert resp.status == 200
        assert (await resp.json())["raw_path"] == "/echo/x?q=1"
    # The upstream is told the client came over https (and a plain listener still says http).
    assert upstream.last.header("X-Forwarded-Proto") == "https"
    plain = await make_gateway(upstream.url)
    async with client.get(f"{plain.url}/echo") as resp:
        assert resp.status == 200
    assert upstream.last.header("X-Forwarded-Proto") == "http"


async def test_tls_13_and_http_11_are_negotiated_by_default(upstream, make_gateway, connect, pki):
    gw = await make_gateway(upstream.url, tls=listener(pki.server_a))
    context = client_context(pki)
    context.set_alpn_protocols(["h2", "http/1.1"])
    connection = await connect(gw.port, context)
    assert connection.ssl.version() == "TLSv1.3"
    assert connection.ssl.selected_alpn_protocol() == "http/1.1"  # never h2: the gateway speaks HTTP/1.1
    assert connection.fingerprint == pki.server_a.fingerprint
    assert (await connection.get())[0] == 200
    # curl offers h2 first, is given HTTP/1.1, and checks the name it connected to (here with SNI).
    status, body = await curl(
        f"https://localhost:{gw.port}/echo", pki.ca.pem, "--resolve", f"localhost:{gw.port}:127.0.0.1"
    )
    assert status == 200 and b'"raw_path": "/echo"' in body


async def test_tls_12_works_with_the_configured_suites_only(upstream, make_gateway, connect, pki):
    gw = await make_gateway(upstream.url, tls=listener(pki.server_a, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384"))
    context = client_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    connection = await connect(gw.port, context)
    assert connection.ssl.version() == "TLSv1.2"
    assert connection.ssl.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    assert (await connection.get())[0] == 200
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")  # not among the listener's
    await handshake_refused(connect, gw.port, context)


async def test_tls_11_is_refused(upstream, make_gateway, connect, pki):
    gw = await make_gateway(upstream.url, tls=listener(pki.server_a))
    context = client_context(pki)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 clients refuse TLS 1.1 themselves otherwise
    with pytest.warns(DeprecationWarning, match="TLSv1_1"):
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    await handshake_refused(connect, gw.port, context)
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # the same client, allowed TLS 1.2
    assert (await connect(gw.port, context)).ssl.version() == "TLSv1.2"


async def test_min_version_13_refuses_tls_12(upstream, make_gateway, pki):
    gw = await make_gateway(upstream.url, tls=listener(pki.server_a, min_version="1.3"))
    old = await s_client(gw.port, pki.ca.pem, "-tls1_2")
    assert (old.fingerprint, old.status) == (None, 0)  # no certificate, no answer: the handshake ended
    new = await s_client(gw.port, pki.ca.pem, "-tls1_3")
    assert new.status == 200 and new.fingerprint == pki.server_a.fingerprint


async def test_responses_finish_and_close_without_the_clients_help(
    upstream, make_gateway, connect, client, pki
):
    """TLS transports pause writing at their high-water mark, TCP ones above it (http_edge.SendWatch): a
    response must still end, and `Connection: close` close the connection, while the client only reads."""
    gw = await make_gateway(upstream.url, tls=listener(pki.server_a))
    connection = await connect(gw.port, client_context(pki))
    connection.writer.write(b"GET /echo HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(IO_TIMEOUT):
        answer = await connection.reader.read()  # to the end: the gateway closes
    assert answer.startswith(b"HTTP/1.1 200 ")
    size = 4 * 1024 * 1024  # far beyond every buffer on the way: writing pauses and resumes
    async with client.get(https(gw, f"/bytes/{size}"), ssl=client_context(pki)) as resp:
        assert resp.status == 200
        assert len(await resp.read()) == size


async def test_plain_http_on_a_tls_listener_gets_no_answer(upstream, make_gateway, client, pki):
    gw = await make_gateway(upstream.url, tls=listener(pki.server_a))
    with pytest.raises(aiohttp.ClientError):
        async with asyncio.timeout(IO_TIMEOUT), client.get(f"{gw.url}/echo"):
            pass


# --- client certificates -----------------------------------------------------------------------------------


def cert_args(issued: Issued) -> tuple[str, ...]:
    return ("--cert", str(issued.cert), "--key", str(issued.key))


async def test_required_client_certificate(upstream, make_gateway, connect, pki):
    gw = await make_gateway(upstream.url, tls=mtls(pki, "required"))
    url = https(gw)
    assert await refused(connect, gw.port, client_context(pki))
    assert await refused(connect, gw.port, client_context(pki, pki.intruder))
    assert not await refused(connect, gw.port, client_context(pki, pki.client))
    assert (await curl(url, pki.ca.pem))[0] == 0
    assert (await curl(url, pki.ca.pem, *cert_args(pki.intruder)))[0] == 0
    assert (await curl(url, pki.ca.pem, *cert_args(pki.client)))[0] == 200
    good = await s_client(gw.port, pki.ca.pem, "-cert", str(pki.client.cert), "-key", str(pki.client.key))
    assert good.status == 200
    assert (await s_client(gw.port, pki.ca.pem)).status == 0


async def test_optional_client_certificate(upstream, make_gateway, connect, pki):
    gw = await make_gateway(upstream.url, tls=mtls(pki, "optional"))
    url = https(gw)
    assert (await curl(url, pki.ca.pem))[0] == 200  # none sent: served
    assert (await curl(url, pki.ca.pem, *cert_args(pki.client)))[0] == 200
    # One that is sent must verify.
    assert await refused(connect, gw.port, client_context(pki, pki.intruder))
    assert (await curl(url, pki.ca.pem, *cert_args(pki.intruder)))[0] == 0


async def test_admin_listener_over_tls(upstream, make_gateway, client, pki):
    gw = await make_gateway(upstream.url, admin_tls=mtls(pki, "required"))
    healthz = f"https://127.0.0.1:{gw.server.admin_address[1]}/healthz"
    assert await curl(healthz, pki.ca.pem, *cert_args(pki.client)) == (200, b'{"status": "ok"}')
    assert (await curl(healthz, pki.ca.pem))[0] == 0  # a probe needs the client certificate too
    # Each listener has its own: the client listener stays plain HTTP here.
    async with client.get(f"{gw.url}/echo") as resp:
        assert resp.status == 200


# --- TLS to the upstream -----------------------------------------------------------------------------------


@dataclass
class TlsUpstream:
    url: str
    client_names: list[str | None]
    """The common name of the client certificate of each request (None: none was sent)."""


@pytest.fixture
async def tls_upstream(pki: Pki) -> AsyncIterator[Callable[..., Awaitable[TlsUpstream]]]:
    """tls_upstream(require_client_cert=False) → an HTTPS upstream on loopback with a certificate from the
    upstream CA, answering /v1.0/me (introspection), /ws (WebSocket echo) and anything else."""
    runners: list[web.AppRunner] = []

    async def factory(require_client_cert: bool = False) -> TlsUpstream:
        names: list[str | None] = []

        def client_name(request: web.BaseRequest) -> str | None:
            assert request.transport is not None
            peer = request.transport.get_extra_info("peercert")
            return dict(pair[0] for pair in peer["subject"])["commonName"] if peer else None

        async def me(request: web.Request) -> web.Response:
            if request.query.get("accesskey") != ACCESS_KEY:
                return web.json_response({"error": "no"}, status=401)
            return web.json_response({"id": "agent-1", "customer_id": "cust-tls"})

        async def websocket(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str(f"{client_name(request)}: {message.data}")
            return ws

        async def anything(request: web.Request) -> web.Response:
            names.append(client_name(request))
            return web.json_response(
                {"scheme": request.scheme, "customer": request.headers.get("X-Gateway-Customer-Id")}
            )

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.upstream.cert, pki.upstream.key)
        if require_client_cert:
            context.load_verify_locations(pki.client_ca.pem)
            context.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_get("/v1.0/me", me)
        app.router.add_get("/ws", websocket)
        app.router.add_get("/{tail:.*}", anything)
        runner = web.AppRunner(app, access_log=None)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        return TlsUpstream(f"https://127.0.0.1:{runner.addresses[0][1]}", names)

    yield factory
    for runner in runners:
        await runner.cleanup()


async def test_upstream_with_a_private_ca(tls_upstream, make_gateway, client, pki):
    up = await tls_upstream()
    gw = await make_gateway(up.url, upstream={"tls": {"ca_file": str(pki.upstream_ca.pem)}})
    async with client.get(f"{gw.url}/a") as resp:
        assert resp.status == 200
        assert (await resp.json())["scheme"] == "https"


@pytest.mark.parametrize("ca", ["system", "other"])
async def test_upstream_certificate_from_an_untrusted_ca_is_a_502(
    tls_upstream, make_gateway, client, pki, ca
):
    up = await tls_upstream()
    upstream: dict[str, Any] = {"tls": {"ca_file": str(pki.other_ca.pem)}} if ca == "other" else {}
    gw = await make_gateway(up.url, upstream=upstream)
    async with client.get(f"{gw.url}/a") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["reason"] == "UPSTREAM_UNAVAILABLE"
    assert up.client_names == []


async def test_upstream_that_requires_a_client_certificate(tls_upstream, make_gateway, client, pki):
    up = await tls_upstream(require_client_cert=True)
    tls_config = {"ca_file": str(pki.upstream_ca.pem)}
    without = await make_gateway(up.url, upstream={"tls": tls_config})
    async with client.get(f"{without.url}/a") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["reason"] == "UPSTREAM_UNAVAILABLE"
    assert up.client_names == []
    mutual = {
        **tls_config,
        "cert_file": str(pki.gateway_client.cert),
        "key_file": str(pki.gateway_client.key),
    }
    gw = await make_gateway(up.url, upstream={"tls": mutual})
    for _ in range(2):  # the second on the pooled connection
        async with client.get(f"{gw.url}/a") as resp:
            assert resp.status == 200
    assert up.client_names == ["gateway-as-client"] * 2


async def test_websocket_and_introspection_use_the_upstream_tls_settings(
    tls_upstream, make_gateway, client, pki
):
    up = await tls_upstream(require_client_cert=True)
    mutual = {
        "ca_file": str(pki.upstream_ca.pem),
        "cert_file": str(pki.gateway_client.cert),
        "key_file": str(pki.gateway_client.key),
    }
    gw = await make_gateway(
        up.url,
        upstream={"tls": mutual},
        routes=[
            {"name": "events", "path": "/ws", "websocket": True, "auth": "none"},
            {"name": "api", "prefix": "/"},  # auth required: access keys are introspected at /v1.0/me
        ],
    )
    async with client.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("hello")
        async with asyncio.timeout(IO_TIMEOUT):
            message = await ws.receive()
        assert (message.type, message.data) == (WSMsgType.TEXT, "gateway-as-client: hello")
    async with client.get(f"{gw.url}/a?accesskey={ACCESS_KEY}") as resp:
        assert resp.status == 200
        assert (await resp.json())["customer"] == "cust-tls"


async def test_jwks_fetches_keep_the_system_store(tls_upstream, make_gateway, client, pki):
    up = await tls_upstream()
    gw = await make_gateway(
        up.url,
        upstream={"tls": {"ca_file": str(pki.upstream_ca.pem)}},
        routes=[{"name": "api", "prefix": "/"}],
        auth={
            "jwt": {"keys": [{"algorithms": ["ES256"], "jwks_url": f"{up.url}/jwks"}]},
            "introspect": {"jwt": False},
        },
    )
    token = jwt.encode({"sub": "u1", "exp": 4102444800}, ec.generate_private_key(ec.SECP256R1()), "ES256")
    async with client.get(f"{gw.url}/a", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 503  # no key set: its certificate is not in the system's store
    assert up.client_names == []  # the key set was never fetched, nor the request forwarded


# --- renewing certificates on a running gateway ---------------------------------------------------------


def copy_files(folder: Path, issued: Issued) -> Issued:
    """The listener's own copies, to be replaced while it runs."""
    live = Issued(folder / "live.pem", folder / "live.key")
    replace_files(live, issued)
    return live


def replace_files(live: Issued, issued: Issued) -> None:
    live.cert.write_bytes(issued.cert.read_bytes())
    live.key.write_bytes(issued.key.read_bytes())


async def test_a_certificate_renewed_on_disk_is_served_without_a_signal(
    upstream, make_gateway, connect, tmp_path, pki
):
    from test_lifecycle import poll

    live = copy_files(tmp_path, pki.server_a)
    gw = await make_gateway(upstream.url, tls=listener(live), auth={"file_check_interval": 0.05})
    kept = await connect(gw.port, client_context(pki))
    # Two writes, as a renewal may be seen: the watch can catch the new chain beside the old key, which is
    # refused, and then applies the pair once both are there.
    replace_files(live, pki.server_b)

    async def renewed() -> bool:
        return (await connect(gw.port, client_context(pki))).fingerprint == pki.server_b.fingerprint

    await poll(renewed, within=15, what="the renewed certificate served")
    assert (await kept.get())[0] == 200


async def test_reload_serves_the_new_certificate_to_new_connections_only(
    upstream, make_gateway, connect, tmp_path, pki
):
    live = copy_files(tmp_path, pki.server_a)
    gw = await make_gateway(upstream.url, tls=listener(live))
    kept = await connect(gw.port, client_context(pki))
    assert kept.fingerprint == pki.server_a.fingerprint
    assert (await kept.get())[0] == 200

    replace_files(live, pki.server_b)
    assert (await connect(gw.port, client_context(pki))).fingerprint == pki.server_a.fingerprint  # not yet
    gw.server.reload_tls(gw.server.config)

    assert (await connect(gw.port, client_context(pki))).fingerprint == pki.server_b.fingerprint
    assert (await connect(gw.port, client_context(pki), "localhost")).fingerprint == pki.server_b.fingerprint
    # The listening context picks the newest one in its SNI callback: also without a server name.
    without_sni = await s_client(gw.port, pki.ca.pem, "-noservername")
    assert (without_sni.fingerprint, without_sni.status) == (pki.server_b.fingerprint, 200)
    with_sni = await s_client(gw.port, pki.ca.pem, "-servername", "localhost", "-tls1_2")
    assert (with_sni.fingerprint, with_sni.status) == (pki.server_b.fingerprint, 200)
    # The connection opened before goes on as it was.
    assert (await kept.get())[0] == 200
    assert kept.fingerprint == pki.server_a.fingerprint


async def test_reload_with_a_bad_file_raises_and_the_old_certificate_stays(
    upstream, make_gateway, connect, tmp_path, pki
):
    live = copy_files(tmp_path, pki.server_a)
    gw = await make_gateway(upstream.url, tls=listener(live))
    live.cert.write_bytes(pki.server_b.cert.read_bytes())  # its key is still server_a's
    with pytest.raises(ConfigError, match=r"tls\.key_file: .*live\.key is not the private key of"):
        gw.server.reload_tls(gw.server.config)
    assert (await connect(gw.port, client_context(pki))).fingerprint == pki.server_a.fingerprint
    live.key.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match=r"tls\.key_file: .*live\.key holds no PEM private key"):
        gw.server.reload_tls(gw.server.config)
    assert (await connect(gw.port, client_context(pki))).fingerprint == pki.server_a.fingerprint


async def test_reload_is_all_or_nothing_across_the_listeners(upstream, make_gateway, connect, tmp_path, pki):
    live = copy_files(tmp_path, pki.server_a)
    admin_folder = tmp_path / "admin"
    admin_folder.mkdir()
    admin_live = copy_files(admin_folder, pki.server_a)
    gw = await make_gateway(upstream.url, tls=listener(live), admin_tls=listener(admin_live))
    replace_files(live, pki.server_b)
    admin_live.cert.unlink()
    with pytest.raises(ConfigError, match=r"admin_tls\.cert_file: cannot read .*live\.pem"):
        gw.server.reload_tls(gw.server.config)
    assert (await connect(gw.port, client_context(pki))).fingerprint == pki.server_a.fingerprint


async def test_reload_renews_the_client_ca(upstream, make_gateway, connect, tmp_path, pki):
    ca_bundle = tmp_path / "client-ca.pem"
    ca_bundle.write_bytes(pki.client_ca.pem.read_bytes())
    gw = await make_gateway(upstream.url, tls={**mtls(pki), "client_ca_file": str(ca_bundle)})
    assert not await refused(connect, gw.port, client_context(pki, pki.client))
    ca_bundle.write_bytes(pki.other_ca.pem.read_bytes())
    gw.server.reload_tls(gw.server.config)
    assert await refused(connect, gw.port, client_context(pki, pki.client))
    assert not await refused(connect, gw.port, client_context(pki, pki.intruder))


async def test_reload_keeps_a_listeners_settings_when_a_change_needs_a_restart(
    upstream, make_gateway, connect, tmp_path, pki
):
    live = copy_files(tmp_path, pki.server_a)
    gw = await make_gateway(upstream.url, tls=listener(live))
    replace_files(live, pki.server_b)
    raw = gw.server.config.model_dump()
    raw["tls"]["min_version"] = "1.3"
    with structlog.testing.capture_logs() as logged:
        assert await gw.server.reload(GatewayConfig.model_validate(raw))  # applied, the listener aside
    assert {
        "event": "config_reload_needs_restart",
        "keys": ["tls.min_version"],
        "log_level": "warning",
    } in logged
    # The listener keeps its settings as it started, and renews its certificate files as any reload does.
    connection = await connect(gw.port, client_context(pki))
    assert connection.fingerprint == pki.server_b.fingerprint
    assert gw.server.config.tls.min_version == "1.2"
    raw["tls"]["cert_file"] = raw["tls"]["key_file"] = None
    with structlog.testing.capture_logs() as logged:
        assert await gw.server.reload(GatewayConfig.model_validate(raw))
    assert ["tls.cert_file"] in [e.get("keys") for e in logged]
    assert (await connection.get())[0] == 200


def test_restart_only_changes() -> None:
    on = TlsConfig(cert_file="c.pem", key_file="k.pem")
    assert tls.restart_only_changes(on, on.model_copy(update={"cert_file": "new.pem"}), "tls") == []
    assert tls.restart_only_changes(on, TlsConfig(), "tls") == ["tls.cert_file"]
    assert tls.restart_only_changes(TlsConfig(), on, "admin_tls") == ["admin_tls.cert_file"]
    assert tls.restart_only_changes(TlsConfig(), TlsConfig(min_version="1.3"), "tls") == []  # TLS off
    changed = on.model_copy(
        update={
            "client_auth": "optional",
            "client_ca_file": "ca.pem",
            "min_version": "1.3",
            "ciphers": "ECDHE",
        }
    )
    assert tls.restart_only_changes(on, changed, "tls") == [
        "tls.client_auth",
        "tls.min_version",
        "tls.ciphers",
    ]


# --- unusable files: start-up and check-config -------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    return {"missing": tmp_path / "missing.pem", "directory": tmp_path, "garbage": garbage}


def unusable_configs(pki: Pki, bad: dict[str, Path]) -> list[tuple[dict[str, Any], str]]:
    """(config, the message naming the key and the file)."""
    a, b = pki.server_a, pki.server_b
    missing, directory, garbage = bad["missing"], bad["directory"], bad["garbage"]
    return [
        ({"tls": listener(a, cert_file=str(missing))}, f"tls.cert_file: cannot read {missing}: No such file"),
        (
            {"tls": listener(a, key_file=str(directory))},
            f"tls.key_file: cannot read {directory}: Is a directory",
        ),
        ({"tls": listener(a, cert_file=str(garbage))}, f"tls.cert_file: {garbage} holds no PEM certificate"),
        ({"tls": listener(a, cert_file=str(a.key))}, f"tls.cert_file: {a.key} holds no PEM certificate"),
        ({"tls": listener(a, key_file=str(a.cert))}, f"tls.key_file: {a.cert} holds no PEM private key"),
        (
            {"admin_tls": listener(a, key_file=str(b.key))},
            f"admin_tls.key_file: {b.key} is not the private key of the certificate in {a.cert}",
        ),
        (
            {"tls": {**mtls(pki), "client_ca_file": str(a.key)}},
            f"tls.client_ca_file: {a.key} holds no PEM certificate",
        ),
        (
            {"upstream": {"tls": {"ca_file": str(missing)}}},
            f"upstream.tls.ca_file: cannot read {missing}: No such file",
        ),
        (
            {"upstream": {"tls": {"cert_file": str(pki.client.cert), "key_file": str(b.key)}}},
            f"upstream.tls.key_file: {b.key} is not the private key of the certificate in {pki.client.cert}",
        ),
    ]


def test_check_config_names_the_key_and_file(pki, bad_files, tmp_path, capsys) -> None:
    for index, (raw, message) in enumerate(unusable_configs(pki, bad_files)):
        path = tmp_path / f"gateway-{index}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        assert cli.main(["check-config", "--config", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"tls": mtls(pki), "admin_tls": listener(pki.server_b)}), encoding="utf-8")
    assert cli.main(["check-config", "--config", str(good)]) == 0


async def test_start_up_fails_before_binding_on_an_unusable_file(pki, bad_files, tmp_path) -> None:
    configs = unusable_configs(pki, bad_files)
    raw, message = configs[0]
    with pytest.raises(ConfigError, match=re.escape(message)):
        GatewayServer(GatewayConfig.model_validate({"listen": "127.0.0.1:0", **raw}))
    # `serve` says so and exits 2; a process, so that were the check to pass, the deadline would end it.
    raw, message = configs[-1]  # an upstream file, which preflight reads before anything starts
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **raw}))
    code, _, err = await run(sys.executable, "-m", "gateway", "serve", "--config", str(path))
    assert code == 2 and message in err and "Traceback" not in err, err


def test_an_encrypted_key_is_refused_without_a_prompt(pki, tmp_path) -> None:
    key = serialization.load_pem_private_key(pki.server_a.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=r"tls\.key_file: .*encrypted\.key is encrypted"):
        tls.server_context(TlsConfig(**listener(pki.server_a, key_file=str(encrypted))), "tls")


# --- the contexts, and the config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_auth", "verify_mode"),
    [("none", ssl.CERT_NONE), ("optional", ssl.CERT_OPTIONAL), ("required", ssl.CERT_REQUIRED)],
)
def test_server_context(pki, client_auth, verify_mode) -> None:
    extra = {} if client_auth == "none" else {"client_ca_file": str(pki.client_ca.pem)}
    context = tls.server_context(TlsConfig(**listener(pki.server_a, client_auth=client_auth, **extra)), "tls")
    assert context.verify_mode == verify_mode
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(TLS_CIPHERS.split(":"))
    assert all("Mac=AEAD" in c["description"] for c in context.get_ciphers())  # TLS 1.3's too
    assert all("Kx=ECDH" in c["description"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2")
    strict = tls.server_context(TlsConfig(**listener(pki.server_a, min_version="1.3")), "tls")
    assert strict.minimum_version == ssl.TLSVersion.TLSv1_3


def test_upstream_context(pki) -> None:
    default = tls.upstream_context(UpstreamConfig())
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    assert default is tls.upstream_context(UpstreamConfig())  # the system store is loaded once
    loose = tls.upstream_context(UpstreamConfig(tls_verify=False))
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    private = tls.upstream_context(UpstreamConfig(tls={"ca_file": str(pki.upstream_ca.pem)}))
    assert private.verify_mode == ssl.CERT_REQUIRED and private.check_hostname
    # The bundle replaces the system store: it holds the one CA.
    assert [ca["subject"] for ca in private.get_ca_certs()] == [((("commonName", "upstreams"),),)]


def test_tls_keys_in_the_environment() -> None:
    config = load_config(
        None,
        environ={
            "GATEWAY_TLS_CERT_FILE": "/etc/gw/cert.pem",
            "GATEWAY_TLS_KEY_FILE": "/etc/gw/key.pem",
            "GATEWAY_TLS_MIN_VERSION": "1.3",
            "GATEWAY_ADMIN_TLS_CERT_FILE": "/etc/gw/admin.pem",
            "GATEWAY_ADMIN_TLS_KEY_FILE": "/etc/gw/admin.key",
            "GATEWAY_UPSTREAM_TLS_CA_FILE": "/etc/gw/internal-ca.pem",
        },
    )
    assert (config.tls.cert_file, config.tls.key_file, config.tls.min_version) == (
        "/etc/gw/cert.pem",
        "/etc/gw/key.pem",
        "1.3",
    )
    assert config.admin_tls.cert_file == "/etc/gw/admin.pem"
    assert config.upstream.tls.ca_file == "/etc/gw/internal-ca.pem"


def test_min_version_unquoted_in_yaml_is_accepted(tmp_path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("tls:\n  min_version: 1.3\n", encoding="utf-8")
    assert load_config(path, environ={}).tls.min_version == "1.3"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls.cert_file": "c.pem"}, "tls.key_file = None: must be set when cert_file is"),
        ({"admin_tls.key_file": "k.pem"}, "admin_tls.cert_file = None: must be set when key_file is"),
        ({"upstream.tls.cert_file": "c.pem"}, "upstream.tls.key_file = None: must be set when cert_file is"),
        (
            {"tls.client_auth": "required"},
            "tls.client_auth = 'required' (from the command line): applies only with TLS on this listener",
        ),
        (
            {"tls.cert_file": "c.pem", "tls.key_file": "k.pem", "tls.client_auth": "optional"},
            "tls.client_auth = 'optional' (from the command line): needs client_ca_file",
        ),
        (
            {"tls.cert_file": "c.pem", "tls.key_file": "k.pem", "tls.client_ca_file": "ca.pem"},
            "tls.client_ca_file = 'ca.pem' (from the command line): is not used while client_auth is none",
        ),
        (
            {"upstream.tls.ca_file": "ca.pem", "upstream.tls_verify": False},
            "upstream.tls.ca_file = 'ca.pem' (from the command line): is not used while upstream.tls_verify",
        ),
        (
            {"tls.min_version": "1.1"},
            "tls.min_version = '1.1' (from the command line): Input should be '1.2'",
        ),
        ({"tls.ciphers": "TLS_AES_128_GCM_SHA256"}, "selects no TLS 1.2 cipher suite"),
        ({"tls.cert_file": ""}, "tls.cert_file = '' (from the command line): String should have at least 1"),
    ],
)
def test_tls_config_errors_name_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, environ={}, overrides=overrides)
    assert message in str(error.value)
