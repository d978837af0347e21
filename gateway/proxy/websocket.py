"""WebSocket pass-through: the client's handshake checked, the upstream handshake, then frames both ways,
pings, pongs and close codes relayed as they are (neither side's library answers pings or closes on its own).
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import structlog
from aiohttp import HttpVersion11, WSMsgType, web
from yarl import URL

from gateway.context import RequestContext
from gateway.envelope import gateway_error
from gateway.filters.errors import GatewayError
from gateway.health import UpstreamHealth
from gateway.proxy.targets import NoTarget, Tries, UpstreamTargets
from gateway.proxy.upstream import classify, send, upstream_headers, within

log = structlog.get_logger("gateway.websocket")

# aiohttp writes its own handshake headers; forwarding the client's would duplicate them.
_HANDSHAKE = frozenset(
    ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol")
)
_UNSENDABLE_CLOSE_CODES = frozenset({1005, 1006, 1015})  # reserved: never put on the wire
_UPSTREAM_LOST = 1011  # internal error: the gateway's side of the relay broke
_CLIENT_LOST = 1001  # going away
_BAD_HANDSHAKE = gateway_error(
    400,
    "INVALID_ARGUMENT",
    "Not a valid WebSocket handshake: it needs GET over HTTP/1.1 with Connection: Upgrade, "
    "Upgrade: websocket, a Sec-WebSocket-Key and Sec-WebSocket-Version: 13.",
    headers={"Sec-WebSocket-Version": "13"},  # RFC 6455 §4.4: the version the gateway speaks
)


class WebSocketProxy:
    def __init__(
        self, session: aiohttp.ClientSession, health: UpstreamHealth, targets: UpstreamTargets
    ) -> None:
        self._session = session
        self._health = health
        self._targets = targets

    async def __call__(self, request: web.BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        route = ctx.route
        assert route is not None
        protocols = tuple(
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
        )
        # aiohttp checks the client's handshake only in prepare(), which has to wait for the upstream's
        # answer (it carries the negotiated subprotocol); checked first, a bad one never reaches the upstream.
        # Offering the client's own subprotocols keeps the check from logging that none overlap.
        # aiohttp also takes the drafts' versions 7 and 8, any method and HTTP/1.0; RFC 6455 §4.1 asks for
        # GET over HTTP/1.1 and version 13.
        if (
            request.method != "GET"
            or request.version != HttpVersion11
            or request.headers.get("Sec-WebSocket-Version") != "13"
            or not web.WebSocketResponse(protocols=protocols).can_prepare(request).ok
        ):
            raise GatewayError(_BAD_HANDSHAKE)
        forwarded, host = upstream_headers(request, ctx)
        headers = [(name, value) for name, value in forwarded if name.lower() not in _HANDSHAKE]
        if route.preserve_host and host:
            headers.append(("Host", host))
        # An event stream counts as in flight (least_request) for as long as it is relayed.
        tries = self._targets.tries(route.pool) if route.pool is not None else None
        try:
            return await self._proxy(request, ctx, headers, protocols, tries)
        finally:
            if tries is not None:
                tries.done()

    async def _proxy(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        headers: list[tuple[str, str]],
        protocols: tuple[str, ...],
        tries: Tries | None,
    ) -> web.StreamResponse:
        route = ctx.route
        assert route is not None
        try:
            if tries is None:
                upstream = await self._handshake(ctx, route.upstream, headers, protocols)
            else:
                upstream = await self._pool_handshake(ctx, headers, protocols, tries)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status >= 400:
                raise GatewayError(gateway_error(exc.status)) from None
            raise GatewayError(
                gateway_error(502, "UPSTREAM_UNAVAILABLE", "The upstream refused the WebSocket upgrade.")
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = classify(exc)
            ctx.upstream_error = failure.kind
            raise GatewayError(failure.error) from None
        except NoTarget:
            assert tries is not None
            failure = tries.exhausted()
            ctx.upstream_error = failure.kind
            raise GatewayError(failure.error) from None

        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), autoping=False, autoclose=False
        )
        client.headers.update(ctx.response_headers)
        try:
            await client.prepare(request)
            await _relay(client, upstream)
        finally:
            await upstream.close()
        return client

    async def _pool_handshake(
        self, ctx: RequestContext, headers: list[tuple[str, str]], protocols: tuple[str, ...], tries: Tries
    ) -> aiohttp.ClientWebSocketResponse:
        """The handshake with a target of the route's pool: a connection that fails is tried again on another
        target, as an idempotent request is (upstream.retries)."""
        route = ctx.route
        assert route is not None

        async def attempt() -> aiohttp.ClientWebSocketResponse:
            try:
                upstream = await self._handshake(ctx, tries.next(), headers, protocols)
            except aiohttp.WSServerHandshakeError:
                tries.answered()
                raise
            except (aiohttp.ClientError, TimeoutError) as exc:
                tries.failed(exc)
                raise
            tries.answered()
            return upstream

        return await send(attempt, retries=route.retries, idempotent=True, failover=True)

    async def _handshake(
        self, ctx: RequestContext, url: str, headers: list[tuple[str, str]], protocols: tuple[str, ...]
    ) -> aiohttp.ClientWebSocketResponse:
        route = ctx.route
        assert route is not None
        ctx.upstream_target = url
        try:
            # The session has no total timeout (bodies stream for as long as they take), so the handshake is
            # bounded here: the route's connect plus response-headers time, a wait for a free max_websockets
            # slot included (that part of a timeout is the gateway's, not the target's: see within()).
            upstream = await within(
                route.connect_timeout + route.response_headers_timeout,
                self._session.ws_connect(
                    URL(url + ctx.target, encoded=True),
                    headers=headers,
                    protocols=protocols,
                    autoping=False,
                    autoclose=False,
                    timeout=aiohttp.ClientWSTimeout(ws_close=route.idle_read_timeout),
                ),
            )
        except aiohttp.WSServerHandshakeError:
            self._health.mark_reachable(url)  # it answered, if not with an upgrade
            raise
        self._health.mark_reachable(url)
        return upstream


Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _relay(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Relay until one side closes, then close the other with the same code.

    The pumps only report a close; closing happens here, after the other pump is stopped, so that its
    pending receive cannot see the closing socket and close with a code of its own first.
    """
    to_upstream = asyncio.create_task(_pump(client, upstream))
    to_client = asyncio.create_task(_pump(upstream, client))
    done, pending = await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finished = to_upstream if to_upstream in done else to_client
    source, sink = (client, upstream) if finished is to_upstream else (upstream, client)
    try:
        close = finished.result()
    except (ConnectionError, aiohttp.ClientError):
        close = None
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
        if close is None:  # the connection went away without a close frame
            await sink.close(code=_CLIENT_LOST if source is client else _UPSTREAM_LOST)
        else:
            code, message = close
            await sink.close(code=code, message=message)
            await source.close(code=code)  # completes the closing handshake with the side that started it


async def _pump(source: Socket, sink: Socket) -> tuple[int, bytes] | None:
    """Forward frames until a close frame arrives (its code and reason) or the connection is lost (None)."""
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await sink.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await sink.pong(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            code = msg.data if msg.data not in _UNSENDABLE_CLOSE_CODES else 1000
            return code, (msg.extra or "").encode()
        else:  # CLOSING, CLOSED or ERROR
            return None
