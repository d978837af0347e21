"""Listeners and lifecycle of one gateway process: bind, serve, drain on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable
from typing import Any

import structlog
from aiohttp import web

from gateway import logs
from gateway.app import Gateway
from gateway.auth.setup import preflight
from gateway.config import ConfigError, GatewayConfig, parse_listen
from gateway.health import admin_app
from gateway.http_edge import EdgeServer, EdgeSettings, parser_limits
from gateway.observability import metrics
from gateway.proxy.ws_relay import CLOSE_REPLY_TIMEOUT
from gateway.reload import (
    ConfigSource,
    FileWatch,
    hold_sighup,
    restart_only_changes,
    watched_files,
    with_restart_only_from,
)
from gateway.resources import Resources
from gateway.tls import ListenerTls, reload_listeners

log = structlog.get_logger("gateway.server")

_CANCEL_GRACE = 1.0
"""How long aiohttp waits for a request still running when the drain time is over, before cancelling it
(twice: its wait, and again after failing the request's body)."""
_DRAIN_POLL = 0.05  # the longest pause between looks whether the drain is over


def bind(address: str, *, reuse_port: bool) -> socket.socket:
    host, port = parse_listen(address)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


class GatewayServer:
    def __init__(
        self, config: GatewayConfig, *, reuse_port: bool = False, source: ConfigSource | None = None
    ) -> None:
        self.config = config
        self._bound = config
        """The config the listeners were opened with: what restart-only keys are compared with."""
        self._reuse_port = reuse_port
        self._source = source
        self.gateway: Gateway | None = None
        """The current generation: every new request goes to it."""
        self._retiring: dict[Gateway, asyncio.Task[None]] = {}
        self._reloading = asyncio.Lock()
        self._reloads: set[asyncio.Task[bool]] = set()
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._watching: tuple[tuple[str, ...], float] | None = None
        self._server: EdgeServer | None = None
        self._runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.address: tuple[str, int] = ("", 0)
        self.admin_address: tuple[str, int] = ("", 0)
        # Built first: a certificate file that cannot be used stops the start before anything is bound.
        self._tls = ListenerTls(config.tls, "tls")
        self._admin_tls = ListenerTls(config.admin_tls, "admin_tls")

    async def start(self) -> None:
        config = self.config
        gateway = self.gateway = Gateway(config)
        await gateway.prepare()
        server = self._server = EdgeServer(
            self._dispatch,
            edge=self._edge_settings(gateway),
            # A client that hangs up cancels its request, so the upstream call is dropped instead of finished.
            handler_cancellation=True,
            auto_decompress=False,  # bodies go upstream as they came, Content-Encoding and all
            access_log=None,
            **_connection_settings(config),
        )
        # The drain itself is stop()'s; aiohttp's wait is only for what is still running at its end.
        self._runner = web.ServerRunner(server, shutdown_timeout=_CANCEL_GRACE)
        await self._runner.setup()
        sock = bind(config.listen, reuse_port=self._reuse_port)
        self.address = sock.getsockname()[:2]
        await web.SockSite(self._runner, sock, ssl_context=self._tls.context).start()

        admin = admin_app(
            lambda: self._current.health,
            lambda: self._current.admission.draining,
            self._redis_up,
            lambda: self._current.config.server.server_header,
        )
        self._admin_runner = web.AppRunner(admin, access_log=None)
        await self._admin_runner.setup()
        admin_sock = bind(config.admin_listen, reuse_port=self._reuse_port)
        self.admin_address = admin_sock.getsockname()[:2]
        await web.SockSite(self._admin_runner, admin_sock, ssl_context=self._admin_tls.context).start()
        gateway.start()
        self._watch_files(config)

    @property
    def _current(self) -> Gateway:
        assert self.gateway is not None
        return self.gateway

    def _dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Looked up per request, not per connection: a kept-alive connection's next request after a reload
        # goes to the new generation.
        return self._current.handle(request)

    def _redis_up(self) -> bool | None:
        shared = self._current.shared_limits
        return None if shared is None else shared.redis_up

    @staticmethod
    def _edge_settings(gateway: Gateway) -> EdgeSettings:
        config = gateway.config
        return EdgeSettings(
            error_format=config.errors.format,
            server_header=config.server.server_header,
            header_timeout=config.server.header_timeout,
            send_timeout=config.server.send_timeout,
            observe=gateway.observe,
        )

    def request_reload(self, reason: str) -> None:
        """Reload in a task of its own (a signal handler, the file watch), kept until it is done."""
        task = asyncio.create_task(self.reload(reason=reason, from_source=reason == "signal"))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(
        self, config: GatewayConfig | None = None, *, reason: str = "signal", from_source: bool = True
    ) -> bool:
        """Apply a new config to new requests; requests in flight finish on the old generation. The config
        is `config`, else the source read again (`from_source`, a signal's reload), else the running one:
        either way its key and certificate files are read again. Values only a restart applies stay as the
        process started with them. A config that fails any check is refused, logged with check-config's
        messages, and changes nothing."""
        async with self._reloading:
            if self._stopping:
                log.info("config_reload_skipped", reason=reason, why="stopping")
                return False
            old = self._current
            try:
                if config is None:
                    config = self._source.load() if from_source and self._source is not None else self.config
                await preflight(config)
                restart_only = restart_only_changes(self._bound, config)
                config = with_restart_only_from(self._bound, config)
            except ConfigError as exc:
                return _refused(reason, exc)
            resources: Resources | None = None
            try:
                resources = Resources(config, old.resources)
                gateway = Gateway(config, resources)
                # Last: it renews the listeners' certificates, all or none, and nothing after it can fail.
                self.reload_tls(config)
            except Exception as exc:  # a file broken since preflight read it, or a bug: the old config stays
                if resources is not None:
                    await resources.close_unshared([old.resources])
                return _refused(reason, exc)
            await gateway.prepare()
            if restart_only:
                log.warning("config_reload_needs_restart", keys=restart_only)
            self.config = config
            self.gateway = gateway
            assert self._server is not None
            self._server.configure(self._edge_settings(gateway), **_connection_settings(config))
            metrics.retire_config_info(old.config_digest)
            gateway.health.inherit(old.health)
            gateway.start()
            for older in (old, *self._retiring):
                older.end_rerouted_streams(gateway)
            self._retiring[old] = asyncio.create_task(self._retire(old))
            self._watch_files(config)
            metrics.config_reloaded(applied=True)
            log.info("config_reloaded", reason=reason, config_hash=gateway.config_digest)
            return True

    async def _retire(self, old: Gateway) -> None:
        try:
            await old.retire()
        finally:
            del self._retiring[old]
        # Parts no generation still serving uses: the current one, or one still finishing its requests.
        await old.resources.close_unshared(g.resources for g in (self._current, *self._retiring))

    def _watch_files(self, config: GatewayConfig) -> None:
        """Re-read the key and certificate files when they change on disk, so revoking a key or renewing a
        certificate needs no signal. A reload that watches the same files keeps the running watch."""
        watching = (watched_files(config), config.auth.file_check_interval)
        if watching == self._watching:
            return
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._watching = watching
        paths, interval = watching
        if interval and paths:
            self._watch = asyncio.create_task(self._check_files(FileWatch(paths), interval))

    async def _check_files(self, files: FileWatch, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if files.changed():
                log.info("watched_file_changed", files=list(files.paths))
                # The running config with its files read again, not the config file: an edit to that waits
                # for its signal. A reload that watches other files cancels this watch; one refused (a file
                # caught mid-write) leaves it running, to try again on the next change.
                self.request_reload("file_changed")

    def reload_tls(self, config: GatewayConfig) -> None:
        """New TLS handshakes on both listeners use `config`'s certificate, key and client CA files as they
        are now; open connections keep theirs. Raises ConfigError, changing neither listener, when a file
        cannot be used; a listener whose TLS keys only a restart applies (reload.restart_only_changes) is
        left alone."""
        reload_listeners((self._tls, config.tls), (self._admin_tls, config.admin_tls))

    async def stop(self) -> None:
        """Stop accepting, end WebSocket streams with 1001, let in-flight requests finish, all within
        server.drain_timeout, then cancel what is left and close."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        async with self._reloading:  # a reload under way ends first; any later one is skipped
            pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.server.drain_timeout
        generations = [g for g in (*self._retiring, self.gateway) if g is not None]
        for gateway in generations:
            gateway.admission.draining = True
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()  # no new connections
        await asyncio.sleep(0)  # requests already in the sockets are read (and answered 503) first
        if self._server is not None:
            # Idle keep-alive connections now; the others after their response (Gateway.handle). Not
            # aiohttp's shutdown yet, which stops reading from every connection: an upload under way must
            # finish, and a stream's peer must still be heard answering its close.
            self._server.close_idle()
        await self._end_streams(generations, deadline)
        for gateway in generations:
            await gateway.idle(pause_max=_DRAIN_POLL, deadline=deadline)
        if self._runner is not None:
            await self._runner.cleanup()
        retiring = list(self._retiring)
        for task in self._retiring.values():
            task.cancel()
        await asyncio.gather(*self._retiring.values(), return_exceptions=True)
        for gateway in (*retiring, self.gateway):
            if gateway is not None:
                await gateway.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        logs.flush_access_log()  # the drained requests' lines, before anything else is said about the stop

    async def _end_streams(self, generations: list[Gateway], deadline: float) -> None:
        """A stream has no end of its own to wait for: each side is told "going away" and given a part of the
        drain time to answer (at most CLOSE_REPLY_TIMEOUT)."""
        within = min(CLOSE_REPLY_TIMEOUT, self.config.server.drain_timeout / 2)
        ending = [done for gateway in generations for done in gateway.end_streams(within)]
        if ending:
            await asyncio.wait(ending, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))


def _refused(reason: str, exc: Exception) -> bool:
    if isinstance(exc, ConfigError):
        log.error("config_reload_failed", reason=reason, problems=str(exc).splitlines())
    else:  # a bug, since the config passed every check
        log.exception("config_reload_failed", reason=reason)
    metrics.config_reloaded(applied=False)
    return False


def _connection_settings(config: GatewayConfig) -> dict[str, Any]:
    """aiohttp's per-connection settings: a reload applies them to connections opened after it."""
    limits = config.limits
    max_line_size, max_field_size = parser_limits(int(limits.max_uri_bytes), int(limits.max_header_bytes))
    return {
        "keepalive_timeout": config.server.keepalive_timeout,
        "max_line_size": max_line_size,
        "max_field_size": max_field_size,
        "max_headers": limits.max_header_count,
    }


async def serve(
    config: GatewayConfig, *, reuse_port: bool = False, source: ConfigSource | None = None
) -> None:
    server = GatewayServer(config, reuse_port=reuse_port, source=source)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    log.info(
        "gateway_started",
        pid=os.getpid(),
        listen=config.listen,
        admin_listen=config.admin_listen,
        upstream=config.upstream.url,
        routes=[route.name for route in config.routes],
        tracing=config.tracing.endpoint if config.tracing.enabled else None,  # where spans go, if anywhere
        event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],  # uvloop or asyncio
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload, "signal")
    # Held back since start-up (hold_sighup): one that came meanwhile is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    await stopping.wait()
    # Ignored from now on, never given back its default action: a SIGHUP while draining (or as the process
    # exits; Python leaves an ignored signal alone at exit) must not end it. Reloads are over: stop() skips
    # any that is still to come.
    loop.remove_signal_handler(signal.SIGHUP)
    hold_sighup()
    assert server.gateway is not None
    log.info(
        "gateway_draining", in_flight=server.gateway.admission.in_flight, timeout=config.server.drain_timeout
    )
    await server.stop()
    log.info("gateway_stopped", pid=os.getpid())


def run(config: GatewayConfig, *, reuse_port: bool = False, source: ConfigSource | None = None) -> None:
    """Run one gateway process until SIGTERM/SIGINT, on uvloop when it is installed; SIGHUP reloads the config
    from `source`."""
    hold_sighup()
    main = serve(config, reuse_port=reuse_port, source=source)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(main)
    finally:
        # Lines of requests cancelled while the loop closed; an exit without this call has atexit's flush.
        logs.flush_access_log()
    # Drained: the loop's handlers are gone, and a second SIGTERM (the supervisor's, after the process group
    # already got one) must not kill the process now and turn a clean exit into a failure.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
