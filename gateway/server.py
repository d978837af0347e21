"""Listeners and lifecycle of one gateway process: bind, serve, drain on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import structlog
from aiohttp import web

from gateway import logs
from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_listen
from gateway.health import admin_app
from gateway.http_edge import EdgeServer, EdgeSettings, parser_limits

log = structlog.get_logger("gateway.server")


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
    def __init__(self, config: GatewayConfig, *, reuse_port: bool = False) -> None:
        self.config = config
        self._reuse_port = reuse_port
        self.gateway: Gateway | None = None
        self._runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.address: tuple[str, int] = ("", 0)
        self.admin_address: tuple[str, int] = ("", 0)

    async def start(self) -> None:
        config = self.config
        limits = config.limits
        gateway = self.gateway = Gateway(config)
        await gateway.prepare()
        max_line_size, max_field_size = parser_limits(int(limits.max_uri_bytes), int(limits.max_header_bytes))
        server = EdgeServer(
            gateway.handle,
            edge=EdgeSettings(
                error_format=config.errors.format,
                server_header=config.server.server_header,
                header_timeout=config.server.header_timeout,
                send_timeout=config.server.send_timeout,
                observe=gateway.observe,
            ),
            # A client that hangs up cancels its request, so the upstream call is dropped instead of finished.
            handler_cancellation=True,
            auto_decompress=False,  # bodies go upstream as they came, Content-Encoding and all
            access_log=None,
            keepalive_timeout=config.server.keepalive_timeout,
            max_line_size=max_line_size,
            max_field_size=max_field_size,
            max_headers=limits.max_header_count,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=config.server.drain_timeout)
        await self._runner.setup()
        sock = bind(config.listen, reuse_port=self._reuse_port)
        self.address = sock.getsockname()[:2]
        await web.SockSite(self._runner, sock).start()

        shared = gateway.shared_limits
        redis_up = None if shared is None else (lambda: shared.redis_up)
        admin = admin_app(
            gateway.health, lambda: gateway.admission.draining, redis_up, config.server.server_header
        )
        self._admin_runner = web.AppRunner(admin, access_log=None)
        await self._admin_runner.setup()
        admin_sock = bind(config.admin_listen, reuse_port=self._reuse_port)
        self.admin_address = admin_sock.getsockname()[:2]
        await web.SockSite(self._admin_runner, admin_sock).start()
        gateway.start()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to server.drain_timeout), then close."""
        if self.gateway is not None:
            self.gateway.admission.draining = True
        if self._runner is not None:
            await self._runner.cleanup()
        if self.gateway is not None:
            await self.gateway.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        logs.flush_access_log()  # the drained requests' lines, before anything else is said about the stop


async def serve(config: GatewayConfig, *, reuse_port: bool = False) -> None:
    server = GatewayServer(config, reuse_port=reuse_port)
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
        event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],  # uvloop or asyncio
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    assert server.gateway is not None
    log.info(
        "gateway_draining", in_flight=server.gateway.admission.in_flight, timeout=config.server.drain_timeout
    )
    await server.stop()
    log.info("gateway_stopped", pid=os.getpid())


def run(config: GatewayConfig, *, reuse_port: bool = False) -> None:
    """Run one gateway process until SIGTERM/SIGINT, on uvloop when it is installed."""
    main = serve(config, reuse_port=reuse_port)
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
