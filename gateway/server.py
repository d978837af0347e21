"""Listeners and lifecycle of one gateway process: bind, serve, drain on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_listen
from gateway.context import RequestContext
from gateway.envelope import ErrorFormat, ErrorInfo, gateway_error, render
from gateway.filters.observe import ObserveFilter
from gateway.health import admin_app
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import new_request_id

log = structlog.get_logger("gateway.server")


def parser_limits(max_uri_bytes: int, max_header_bytes: int) -> tuple[int, int]:
    """(max_line_size, max_field_size) for aiohttp's parser: the request target's limit, then one header
    line's. A LineTooLong carries the limit it broke (its args[1]), which is how protocol_error tells a long
    URI from a long header; so when the two are configured equal the field limit gets one byte more, which
    changes no answer because Admission enforces max_header_bytes on all header lines together anyway."""
    return max_uri_bytes, max_header_bytes + (max_header_bytes == max_uri_bytes)


def protocol_error(status: int, exc: BaseException | None, max_line_size: int) -> ErrorInfo:
    """The envelope for a request aiohttp's HTTP parser rejected before it reached the filter chain;
    `max_line_size` is the parser's (see parser_limits)."""
    if isinstance(exc, LineTooLong) and exc.args[1] == max_line_size:
        return gateway_error(414, "URI_TOO_LONG")
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
        return gateway_error(431, "HEADERS_TOO_LARGE")
    if status >= 500:
        return gateway_error(500, "INTERNAL")
    return gateway_error(status, "MALFORMED_REQUEST", "The request is not valid HTTP.")


class _EnvelopeRequestHandler(web.RequestHandler):
    error_format: ErrorFormat = "canonical"
    server_header: str
    max_line_size: int
    observe: ObserveFilter

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # The client left mid-request; the request's own access-log line already says so (499).
            raise ConnectionError("client disconnected")
        ctx = RequestContext(new_request_id(), time.perf_counter(), request.remote, peer_trusted=False)
        error = protocol_error(status, exc, self.max_line_size)
        # Only the exception's type: parser messages quote the offending bytes, which may be a credential.
        log.warning(
            "bad_http_request", request_id=ctx.request_id, reason=error.reason, error=type(exc).__name__
        )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        ctx.error_reason = error.reason
        response = web.Response(
            status=error.http_status,
            body=render(error, ctx.request_id, self.error_format),
            content_type="application/json",
            headers={REQUEST_ID_HEADER: ctx.request_id, hdrs.SERVER: self.server_header},
        )
        response.force_close()
        self.observe.rejected(ctx, response)  # never reached the filter chain, so recorded here
        return response


class _EnvelopeServer(web.Server):
    """aiohttp's low-level server, with parser errors answered in the envelope instead of text/plain."""

    def __init__(
        self,
        handler: Any,
        *,
        error_format: ErrorFormat,
        server_header: str,
        observe: ObserveFilter,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._error_format = error_format
        self._server_header = server_header
        self._observe = observe

    def __call__(self) -> web.RequestHandler:
        handler = _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.error_format = self._error_format
        handler.server_header = self._server_header
        handler.max_line_size = self._kwargs["max_line_size"]
        handler.observe = self._observe
        return handler


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
        server = _EnvelopeServer(
            gateway.handle,
            error_format=config.errors.format,
            server_header=config.server.server_header,
            observe=gateway.observe,
            # A client that hangs up cancels its request, so the upstream call is dropped instead of finished.
            handler_cancellation=True,
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
        gateway.health.start()

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
        asyncio.run(main)
    else:
        uvloop.run(main)
    # Drained: the loop's handlers are gone, and a second SIGTERM (the supervisor's, after the process group
    # already got one) must not kill the process now and turn a clean exit into a failure.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
