"""What a config reload reads and what it cannot change: the source of the running config, the keys that only
a restart applies, the key and certificate files watched for changes, and SIGHUP before it can be handled.

Pure apart from reading the config file and stat-ing watched files; the swap itself is the server's
(GatewayServer.reload in server.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway import tls
from gateway.config import GatewayConfig, load_config

RESTART_ONLY = (
    "listen",
    "admin_listen",
    "server.workers",
    "server.pid_file",
    "server.drain_timeout",
    "logging.level",
    "logging.format",
    "metrics.multiprocess_dir",
)
"""Keys a running process cannot apply: bound sockets, the process layout, the stop's deadline (the
supervisor's and each worker's must agree), the log pipeline set up at start. A reload that changes them
applies everything else and says these wait for a restart."""


@dataclass(frozen=True)
class ConfigSource:
    """Where the running config came from, so a reload reads it the same way: the same file (or
    $GATEWAY_CONFIG), the GATEWAY_* environment, and the command line's overrides."""

    path: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> GatewayConfig:
        return load_config(self.path, overrides=self.overrides)


def hold_sighup() -> None:
    """SIGHUP's default action ends the process: until a reload can be handled (server.serve()), and again
    once stopping, it is ignored and held back in this thread. Both outlive exec, so a supervisor's workers
    start this way too; one held back before serve() handles SIGHUP is delivered then."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def restart_only_changes(bound: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The keys only a restart applies whose values in `new` differ from those the process started with:
    RESTART_ONLY, and the listeners' TLS keys that tls.restart_only_changes names."""
    keys = [key for key in RESTART_ONLY if _get(bound, key) != _get(new, key)]
    keys += tls.restart_only_changes(bound.tls, new.tls, "tls")
    return keys + tls.restart_only_changes(bound.admin_tls, new.admin_tls, "admin_tls")


def with_restart_only_from(bound: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    """`new`, but with what only a restart applies as the process started with it (`bound`): the config
    a reload runs, and the one a worker restarted after it starts with, so siblings never differ in them.
    A listener whose TLS changed in a restart-only way keeps its whole section, certificate files included,
    as tls.ListenerTls does."""
    data, started = new.model_dump(), bound.model_dump()
    for key in RESTART_ONLY:
        *parents, leaf = key.split(".")
        node, source = data, started
        for part in parents:
            node, source = node[part], source[part]
        node[leaf] = source[leaf]
    for section in ("tls", "admin_tls"):
        if tls.restart_only_changes(getattr(bound, section), getattr(new, section), section):
            data[section] = started[section]
    return GatewayConfig.model_validate(data)


def _get(config: GatewayConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def watched_files(config: GatewayConfig) -> tuple[str, ...]:
    """Files whose change is applied without a signal: the access-key file, the pepper and JWT key files,
    and the certificate files (a renewal, e.g. by cert-manager, needs no signal either)."""
    paths = [*auth_files(config), *upstream_tls_files(config)]
    for listener in (config.tls, config.admin_tls):
        paths += [listener.cert_file, listener.key_file, listener.client_ca_file]
    return tuple(dict.fromkeys(p for p in paths if p))


def auth_files(config: GatewayConfig) -> tuple[str, ...]:
    keys = config.auth.access_keys
    paths = [keys.file, keys.pepper_file]
    paths += [key.secret_file or key.public_key_file for key in config.auth.jwt.keys]
    return tuple(p for p in paths if p)


def upstream_tls_files(config: GatewayConfig) -> tuple[str, ...]:
    upstream = config.upstream.tls
    return tuple(p for p in (upstream.ca_file, upstream.cert_file, upstream.key_file) if p)


Stamp = tuple[int, int, int] | None


class FileWatch:
    """Tells whether any of a set of files changed since the last look (modification time, size, inode: an
    editor or a Kubernetes secret update replaces the file, a rewrite in place changes its time)."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._paths = tuple(paths)
        self._seen = self._stamps()

    @property
    def paths(self) -> tuple[str, ...]:
        return self._paths

    def changed(self) -> bool:
        now = self._stamps()
        if now == self._seen:
            return False
        self._seen = now
        return True

    def _stamps(self) -> tuple[Stamp, ...]:
        return stamps(self._paths)


def stamps(paths: Iterable[str]) -> tuple[Stamp, ...]:
    return tuple(_stamp(path) for path in paths)


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None  # gone for now (mid-replace): a change like any other
    return (st.st_mtime_ns, st.st_size, st.st_ino)
