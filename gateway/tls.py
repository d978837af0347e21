"""TLS: the listeners' server contexts, the upstream client context, and certificates renewed on a running
listener.

Every context is built from the config's files. A file that cannot be read or used is a ConfigError naming
its key and path: at start-up, in `check-config` (both through auth/setup.py's preflight) and on a reload,
which then changes nothing.

Renewal keeps the socket and every open connection. A listener stays bound with the context it started with;
OpenSSL calls that context's SNI callback early in every handshake, whether or not the client sent a server
name, and the callback moves the handshake to the newest context, whose certificate chain, key and client CA
bundle then apply. Connections already open keep the context they were made with. What OpenSSL copies from
the bound context when it accepts a connection, before that callback runs, cannot change this way: the
protocol versions and whether a client certificate is asked for (min_version, client_auth); the cipher list
is treated alike. Those, and switching TLS on or off (a new socket), wait for a restart.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from typing import TypeVar

from gateway.config import ConfigError, GatewayConfig, TlsConfig, UpstreamConfig

_T = TypeVar("_T")
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
RESTART_ONLY = ("client_auth", "min_version", "ciphers")
"""A TLS listener's keys a reload cannot apply (see the module docstring), besides switching TLS on or off."""
_ALPN = ("http/1.1",)


def server_context(tls: TlsConfig, section: str) -> ssl.SSLContext:
    """A listener's context from `tls`, whose cert_file is set; `section` ("tls", "admin_tls") names it in
    errors."""
    assert tls.cert_file is not None and tls.key_file is not None  # config_checks: TLS on, with its key
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.set_ciphers(tls.ciphers)  # validated with the config
    context.set_alpn_protocols(list(_ALPN))
    # Renegotiation (TLS 1.2) lets a client make the server redo the costly half of a handshake at will.
    context.options |= ssl.OP_NO_RENEGOTIATION
    _load_chain(context, section, tls.cert_file, tls.key_file)
    if tls.client_auth != "none":
        ca_file = tls.client_ca_file
        assert ca_file is not None  # config_checks
        _from_file(
            f"{section}.client_ca_file", ca_file, lambda: context.load_verify_locations(cafile=ca_file)
        )
        context.verify_mode = _CLIENT_AUTH[tls.client_auth]
    return context


def upstream_context(upstream: UpstreamConfig) -> ssl.SSLContext:
    """The client context for https:// upstreams: their certificate and host name verified against
    upstream.tls.ca_file or else the system's CA store (neither with tls_verify false), and the client
    certificate presented when one is configured."""
    tls = upstream.tls
    if tls.ca_file is None and tls.cert_file is None:
        return _system_context(upstream.tls_verify)
    ca_file = tls.ca_file
    if ca_file is None:
        context = ssl.create_default_context()
    else:
        context = _from_file(
            "upstream.tls.ca_file", ca_file, lambda: ssl.create_default_context(cafile=ca_file)
        )
    _verify(context, upstream.tls_verify)
    if tls.cert_file is not None:
        assert tls.key_file is not None  # config_checks
        _load_chain(context, "upstream.tls", tls.cert_file, tls.key_file)
    return context


@functools.cache
def _system_context(verify: bool) -> ssl.SSLContext:
    """Once per process, shared by every pool: loading the system's CA store takes ~20 ms, and this context
    reads no file the config names."""
    context = ssl.create_default_context()
    _verify(context, verify)
    return context


def _verify(context: ssl.SSLContext, verify: bool) -> None:
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE


def check_files(config: GatewayConfig) -> None:
    """Build every context the config asks for, and drop them: an unusable file is a ConfigError now."""
    for section, tls in (("tls", config.tls), ("admin_tls", config.admin_tls)):
        if tls.cert_file is not None:
            server_context(tls, section)
    upstream_context(config.upstream)


def _load_chain(context: ssl.SSLContext, section: str, cert_file: str, key_file: str) -> None:
    cert_key, key_key = f"{section}.cert_file", f"{section}.key_file"
    _readable(cert_key, cert_file)
    _readable(key_key, key_file)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _PassphraseAsked:
        raise _error(key_key, f"{key_file} is encrypted: a key with a passphrase cannot be used") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _error(
                key_key, f"{key_file} is not the private key of the certificate in {cert_file}"
            ) from None
        if not _holds_certificate(cert_file):
            raise _error(cert_key, f"{cert_file} holds no PEM certificate") from None
        raise _error(key_key, f"{key_file} holds no PEM private key") from None
    except OSError as exc:  # a file went away since it was opened above
        raise _error(cert_key, f"cannot read {cert_file} or {key_file}: {exc.strerror or exc}") from None


class _PassphraseAsked(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a password callback OpenSSL asks for the passphrase on the terminal, and start-up would hang.
    raise _PassphraseAsked


def _readable(key: str, path: str) -> None:
    # load_cert_chain's own OSError does not say which of its two files it could not read.
    _from_file(key, path, lambda: open(path, "rb").close())


def _holds_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except OSError:  # ssl.SSLError included
        return False
    return True


def _from_file(key: str, path: str, load: Callable[[], _T]) -> _T:
    """load(), which reads `path` (PEM certificates): its failure is a ConfigError naming `key` and `path`."""
    try:
        return load()
    except ssl.SSLError:
        raise _error(key, f"{path} holds no PEM certificate") from None
    except OSError as exc:
        raise _error(key, f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _error(key: str, message: str) -> ConfigError:
    return ConfigError(f"invalid configuration: {key}: {message}")


def restart_only_changes(bound: TlsConfig, new: TlsConfig, section: str) -> list[str]:
    """The keys of a listener's TLS that `new` changes and only a restart applies."""
    if (bound.cert_file is None) != (new.cert_file is None):
        return [f"{section}.cert_file"]  # TLS switched on or off
    if bound.cert_file is None:
        return []
    return [f"{section}.{name}" for name in RESTART_ONLY if getattr(bound, name) != getattr(new, name)]


class ListenerTls:
    """One listener's TLS. `context` is what the listener is bound with (None: plain HTTP); new handshakes
    use the newest context: reload_listeners() builds one from the files as they are then."""

    def __init__(self, config: TlsConfig, section: str) -> None:
        self._bound = config
        self._section = section
        self.context = server_context(config, section) if config.cert_file is not None else None
        self._newest = self.context
        if self.context is not None:
            self.context.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, bound: ssl.SSLContext) -> None:
        newest = self._newest
        if newest is not bound:
            connection.context = newest  # type: ignore[assignment]  # never None while bound is not

    def restart_only_changes(self, config: TlsConfig) -> list[str]:
        return restart_only_changes(self._bound, config, self._section)

    def renewed(self, config: TlsConfig) -> ssl.SSLContext | None:
        """A context built from `config`'s files for new handshakes (ConfigError when one cannot be used), or
        None when nothing is renewed: the listener is plain HTTP, or `config` changes a key only a restart
        applies, and then its running context stays whole."""
        if self.context is None or self.restart_only_changes(config):
            return None
        return server_context(config, self._section)

    def use(self, context: ssl.SSLContext) -> None:
        self._newest = context


def reload_listeners(*changes: tuple[ListenerTls, TlsConfig]) -> None:
    """Renew listeners' certificates together: every file is read before any listener changes, so one that
    cannot be used (ConfigError) changes none."""
    renewed = [(listener, listener.renewed(config)) for listener, config in changes]
    for listener, context in renewed:
        if context is not None:
            listener.use(context)
