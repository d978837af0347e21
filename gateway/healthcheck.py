"""`voipbin-gateway healthcheck`: exit 0 when the admin listener's /healthz answers 200, else 1.

Made for the image's HEALTHCHECK and exec probes. It takes admin_listen and admin_tls from where `serve`
does (--admin-listen, GATEWAY_* variables, the file from --config or $GATEWAY_CONFIG), so the check follows
them wherever a deployment sets them, and dials the listener on loopback. It validates only those keys: the
rest of the file may be one the running gateway refused on reload. Plain asyncio streams: the check starts
every few seconds, so it stays light, and one deadline bounds the connect, the TLS handshake, the request
and the status line together.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import os
import re
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from gateway.config import (
    CONFIG_PATH_ENV,
    ENV_PREFIX,
    ConfigError,
    GatewayConfig,
    ListenAddress,
    TlsConfig,
    parse_listen,
    read_config_file,
)

PATH = "/healthz"
_CONFIG_HELP = "YAML config file (default: $GATEWAY_CONFIG, else built-in defaults)"
DEFAULT_TIMEOUT = 3.0
"""Well below the Dockerfile's HEALTHCHECK --timeout (5 s), which also counts the interpreter's start and
imports, so a slow answer is reported with our reason rather than cut off by Docker without one."""
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r?\n")
_ADMIN_TLS_KEYS = ("cert_file", "client_auth")
"""All the check takes from admin_tls: whether to speak TLS, and whether it needs a client certificate."""
# The variables `serve` reads them from: GATEWAY_ADMIN_LISTEN, GATEWAY_ADMIN_TLS_CERT_FILE, ...
_ENV_NAMES = {
    key: ENV_PREFIX + key.replace(".", "_").upper()
    for key in ("admin_listen", *(f"admin_tls.{tls_key}" for tls_key in _ADMIN_TLS_KEYS))
}
_LISTEN_ADDRESS = TypeAdapter(ListenAddress)
# An address this network namespace does not have (::1 where IPv6 is off, as in Docker's default networks).
_NO_SUCH_ADDRESS = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.ENETUNREACH})


@dataclass(frozen=True)
class Probe:
    """Where the check dials and how: `hosts` in order, the next only when one does not exist here."""

    hosts: tuple[str, ...]
    port: int
    tls: bool
    client_cert_required: bool

    @property
    def url(self) -> str:
        host = f"[{self.hosts[0]}]" if ":" in self.hosts[0] else self.hosts[0]
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{PATH}"

    @property
    def target(self) -> str:
        """The URL for messages, naming the fallbacks too."""
        return self.url + "".join(f" (or {host})" for host in self.hosts[1:])


def dial_hosts(listen_host: str) -> tuple[str, ...]:
    """A wildcard listener also answers on loopback, which every network namespace has: 0.0.0.0 on
    127.0.0.1, [::] on [::1]. A [::] socket is dual-stack on Linux (the gateway does not set IPV6_V6ONLY), so
    127.0.0.1 reaches it too where there is no ::1 (IPv6 off, as in Docker's default networks). A specific
    address or a name is dialled as it is."""
    try:
        address = ipaddress.ip_address(listen_host)
    except ValueError:
        return (listen_host,)  # a name such as localhost
    if not address.is_unspecified:
        return (listen_host,)
    return ("::1", "127.0.0.1") if address.version == 6 else ("127.0.0.1",)


def probe_for(admin_listen: str, admin_tls: TlsConfig) -> Probe:
    host, port = parse_listen(admin_listen)
    return Probe(
        hosts=dial_hosts(host),
        port=port,
        tls=admin_tls.cert_file is not None,
        client_cert_required=admin_tls.client_auth == "required",
    )


def configured_probe(path: str | None, *, environ: Mapping[str, str], admin_listen: str | None) -> Probe:
    """The probe for admin_listen and admin_tls's cert_file and client_auth, each from the first of the
    sources `serve` reads that sets it: --admin-listen, GATEWAY_* variables, the file from --config or
    $GATEWAY_CONFIG, the defaults.

    Only these keys are read and validated. A running gateway refuses a bad config on reload and keeps
    serving the one it has, so its liveness must not fail over another key: an exec liveness probe would
    restart it into a start that fails. ConfigError, in one line naming the key, when one of these is invalid.
    """
    path = path or environ.get(CONFIG_PATH_ENV)
    file = read_config_file(Path(path)) if path else {}
    in_file = f"config file {path}"
    section = file.get("admin_tls", {})
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"admin_tls = {section!r} (from {in_file}): must be a mapping such as {{cert_file: ..., ...}}"
        )
    found: dict[str, tuple[Any, str]] = {}  # key → (value, where it came from); later sources win
    if "admin_listen" in file:
        found["admin_listen"] = (file["admin_listen"], in_file)
    found |= {f"admin_tls.{key}": (section[key], in_file) for key in _ADMIN_TLS_KEYS if key in section}
    found |= {key: (environ[name], name) for key, name in _ENV_NAMES.items() if name in environ}
    if admin_listen is not None:
        found["admin_listen"] = (admin_listen, "--admin-listen")
    return _validated_probe(found)


def _validated_probe(found: Mapping[str, tuple[Any, str]]) -> Probe:
    problems: list[str] = []
    listen = GatewayConfig.model_fields["admin_listen"].default
    try:
        if "admin_listen" in found:
            listen = _LISTEN_ADDRESS.validate_python(found["admin_listen"][0])
    except ValidationError as exc:
        problems += _described(exc, "admin_listen", found)
    # The section's own model, given only the keys the check uses: the others keep their defaults unread.
    tls_keys = {
        key.removeprefix("admin_tls."): value for key, (value, _) in found.items() if key != "admin_listen"
    }
    try:
        admin_tls = TlsConfig.model_validate(tls_keys)
    except ValidationError as exc:
        problems += _described(exc, "admin_tls", found)
    if problems:
        raise ConfigError("; ".join(problems))
    return probe_for(listen, admin_tls)


def _described(exc: ValidationError, key: str, found: Mapping[str, tuple[Any, str]]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        dotted = ".".join([key, *map(str, error["loc"])])
        value, origin = found[dotted]
        problems.append(f"{dotted} = {value!r} (from {origin}): {error['msg']}")
    return problems


def tls_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    # A liveness check of the gateway's own listener on loopback: it asks whether the process answers, not
    # who answers. The certificate is issued for the public name (or a private CA the container may not
    # hold), not for 127.0.0.1, so neither the name nor the chain is verified.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def status_of(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line, or None when the line is not one."""
    match = _STATUS_LINE.fullmatch(line)
    return int(match[1]) if match else None


async def check(probe: Probe, *, within: float, context: ssl.SSLContext | None) -> str | None:
    """None when /healthz answered 200 within `within` seconds; otherwise why not, in one line."""
    try:
        async with asyncio.timeout(within):
            line = await _first_status_line(probe, context)
    except TimeoutError:
        return f"{probe.target}: no answer within {within:g}s"
    except asyncio.LimitOverrunError:  # the stream's 64 KiB limit reached without a line end
        return _not_http(probe)
    except ssl.SSLError as exc:  # before OSError, of which it is one
        return f"{probe.target}: TLS handshake failed: {exc.reason or exc}"
    except ConnectionRefusedError:  # asyncio words it "Connect call failed (address)"
        return f"{probe.target}: connection refused (nothing listens there)"
    except OSError as exc:
        return f"{probe.target}: {exc.strerror or exc}"
    if not line:
        # What a TLS listener asked in plain HTTP, or one refusing the client certificate, ends in.
        return f"{probe.target}: the connection was closed without an answer"
    status = status_of(line)
    if status is None:
        return _not_http(probe)
    if status != 200:
        return f"{probe.target}: answered {status}"
    return None


def _not_http(probe: Probe) -> str:
    return f"{probe.target}: the answer is not HTTP/1.x (is admin_listen the admin listener?)"


async def _first_status_line(probe: Probe, context: ssl.SSLContext | None) -> bytes:
    *fallible, last = probe.hosts
    for host in fallible:
        try:
            return await _status_line(host, probe.port, context)
        except OSError as exc:
            if exc.errno not in _NO_SUCH_ADDRESS:
                raise
    return await _status_line(last, probe.port, context)


async def _status_line(host: str, port: int, context: ssl.SSLContext | None) -> bytes:
    """The answer's first line; b"" when the connection ended before one came."""
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = f"GET {PATH} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("ascii"))
        await writer.drain()
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial  # closed before a line end: nothing, or a line cut off
    except (ConnectionResetError, BrokenPipeError):
        # A peer that closes without reading the request makes its kernel send a reset instead of a close,
        # depending on timing: the same answer, none.
        return b""
    finally:
        writer.close()  # not awaited: the process ends right after, and a peer's slow close is not our health


def add_command(subparsers: Any) -> None:
    """Add `healthcheck` to the `voipbin-gateway` parser's subparsers."""
    command = subparsers.add_parser(
        "healthcheck", help="exit 0 if the admin listener's /healthz answers 200, else 1 with the reason"
    )
    command.add_argument("--config", help=_CONFIG_HELP)
    command.add_argument("--admin-listen", metavar="HOST:PORT", help="overrides admin_listen, as for serve")
    command.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"for the whole check (default {DEFAULT_TIMEOUT:g})",
    )  # fmt: skip
    command.add_argument(
        "--cert", metavar="PEM", help="client certificate, when admin_tls.client_auth is required"
    )
    command.add_argument("--key", metavar="PEM", help="its private key, unless --cert holds both")


def run(args: argparse.Namespace) -> int:
    try:
        probe = configured_probe(args.config, environ=os.environ, admin_listen=args.admin_listen)
    except ConfigError as exc:
        reason: str | None = f"config: {exc}"
    else:
        reason = _diagnose(probe, args)
    if reason is None:
        return 0
    # One line whatever the reason (a YAML error spans several): `docker inspect` and probe events show it.
    print("unhealthy: " + " ".join(reason.split()), file=sys.stderr)
    return 1


def _diagnose(probe: Probe, args: argparse.Namespace) -> str | None:
    if not probe.tls:
        return asyncio.run(check(probe, within=args.timeout, context=None))
    if probe.client_cert_required and args.cert is None:
        # Said as what it is, not as the handshake failure it would end in whatever the gateway's state.
        return (
            f"{probe.target}: admin_tls.client_auth is required, so /healthz needs a client certificate: "
            "pass --cert and --key, or set admin_tls.client_auth to optional"
        )
    try:
        context = tls_context(args.cert, args.key)
    except OSError as exc:  # ssl.SSLError included
        key = f" / --key {args.key}" if args.key else ""
        return f"cannot load --cert {args.cert}{key}: {exc.strerror or exc}"
    return asyncio.run(check(probe, within=args.timeout, context=context))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value
