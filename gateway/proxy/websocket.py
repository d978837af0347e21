"""WebSocket pass-through: the client's handshake checked, a slot of the WebSocket pool taken, the upstream
handshake, then the stream relayed (proxy/ws_relay.py) until either side closes or the gateway ends it (stop,
reload). Pings, pongs and close codes go through as they are: neither side's library answers them itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import structlog
from aiohttp import HttpVersion11, web
from multidict import CIMultiDictProxy
from opentelemetry.trace import SpanKind
from yarl import URL

from gateway.context import RequestContext
from gateway.cors import take_over_upstream_cors
from gateway.envelope import ErrorFormat, gateway_error
from gateway.filters.admission import DRAINING
from gateway.filters.errors import GatewayError
from gateway.forwarding import end_to_end
from gateway.health import UpstreamHealth
from gateway.observability import spans
from gateway.proxy.error_response import upstream_error_response
from gateway.proxy.targets import NoTarget, Tries, UpstreamTargets
from gateway.proxy.upstream import (
    UpgradeRefused,
    WebSocketPool,
    classify,
    describe_upstream_call,
    send,
    upgrade_answer,
    upstream_headers,
    within,
)
from gateway.proxy.ws_relay import CLOSE_REPLY_TIMEOUT, GOING_AWAY, GOING_AWAY_REASONS, ClientSide, Relay
from gateway.routing import Route

log = structlog.get_logger("gateway.websocket")

# aiohttp writes its own handshake headers; forwarding either side's would duplicate them.
_HANDSHAKE = frozenset(
    (
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "content-length",
    )
)
_BAD_HANDSHAKE = gateway_error(
    400,
    "INVALID_ARGUMENT",
    "Not a valid WebSocket handshake: it needs GET over HTTP/1.1 with Connection: Upgrade, "
    "Upgrade: websocket, a Sec-WebSocket-Key and Sec-WebSocket-Version: 13.",
    headers={"Sec-WebSocket-Version": "13"},  # RFC 6455 §4.4: the version the gateway speaks
)
_POOL_FULL = gateway_error(
    503, "SERVICE_UNAVAILABLE", "Too many WebSocket streams are open to the upstream; try again later."
)
_BAD_UPGRADE = gateway_error(502, "UPSTREAM_UNAVAILABLE", "The upstream refused the WebSocket upgrade.")
_ENDED = {
    "shutdown": DRAINING,
    "reload": gateway_error(
        503, "SERVICE_UNAVAILABLE", "This route was reconfigured meanwhile; connect again."
    ),
}


Keep = Callable[[Route, str], bool]
"""Whether a stream of this route, relayed to this upstream URL, goes on (see end_streams)."""


def _keep_none(route: Route, target: str) -> bool:
    return False


class WebSocketProxy:
    def __init__(
        self,
        pool: WebSocketPool,
        health: UpstreamHealth,
        targets: UpstreamTargets,
        *,
        compression: bool,
        error_format: ErrorFormat,
        max_error_body_bytes: int,
        send_timeout: float,
    ) -> None:
        self._pool = pool
        self._send_timeout = send_timeout
        self._health = health
        self._targets = targets
        self._compression = compression
        self._fmt = error_format
        self._max_error_body = max_error_body_bytes
        self._streams: set[Relay] = set()
        self._ending: tuple[str, float, Keep] | None = None
        """The last end_streams(): a stream whose handshake was under way then is held to it too."""

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
        # Refused at once when full, as Envoy's circuit breakers do: a queued upgrade would wait for a stream
        # to end, which can take hours.
        if not self._pool.take():
            ctx.upstream_error = "pool_full"
            raise GatewayError(_POOL_FULL)
        forwarded, host = upstream_headers(request, ctx)
        headers = [(name, value) for name, value in forwarded if name.lower() not in _HANDSHAKE]
        if route.preserve_host and host:
            headers.append(("Host", host))
        # An event stream counts as in flight (least_request) for as long as it is relayed.
        tries = self._targets.tries(route.pool) if route.pool is not None else None
        try:
            return await self._proxy(request, ctx, headers, protocols, tries)
        finally:
            self._pool.give_back()
            if tries is not None:
                tries.done()

    def end_streams(self, why: str, within: float, keep: Keep = _keep_none) -> list[asyncio.Future[None]]:
        """End every open stream whose route `keep` does not keep with 1001 to both sides, each side given
        `within` seconds to answer (ws_relay.Relay.going_away); futures done once they have. A handshake
        still under way is refused with 503 once the upstream answers."""
        self._ending = (why, within, keep)
        ended = [relay for relay in self._streams if not keep(relay.route, relay.target)]
        for relay in ended:
            relay.going_away(why, within)
        return [relay.finished for relay in ended]

    def _ended(self, ctx: RequestContext) -> str | None:
        """Why end_streams() has ended this upgrade's stream since it began, or None."""
        assert ctx.route is not None and ctx.upstream_target is not None
        if self._ending is None or self._ending[2](ctx.route, ctx.upstream_target):
            return None
        return self._ending[0]

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
        except UpgradeRefused as refused:
            return await self._refusal(ctx, refused.response)
        except aiohttp.WSServerHandshakeError:  # a 101 whose handshake headers are wrong
            ctx.upstream_error = "protocol"
            raise GatewayError(_BAD_UPGRADE) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = classify(exc)
            ctx.upstream_error = failure.kind
            raise GatewayError(failure.error) from None
        except NoTarget:
            assert tries is not None
            failure = tries.exhausted()
            ctx.upstream_error = failure.kind
            raise GatewayError(failure.error) from None

        client = ClientSide(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            autoclose=False,
            compress=self._compression,
            max_msg_size=_aiohttp_limit(route.max_message_bytes),
            decode_text=False,
            timeout=CLOSE_REPLY_TIMEOUT,
        )
        answer = upgrade_answer()
        assert answer is not None  # set by the same handshake
        # The upstream's own headers on its 101 (Set-Cookie, ...); ours win.
        client.headers.extend(_upgrade_response_headers(answer.headers))
        if ctx.cors:
            take_over_upstream_cors(client.headers, ctx.response_headers)
        client.headers.update(ctx.response_headers)
        why = self._ended(ctx)
        if why is not None:
            await upstream.close(code=GOING_AWAY, message=GOING_AWAY_REASONS[why])
            raise GatewayError(_ENDED[why])
        relay = Relay(
            client,
            upstream,
            ctx,
            transports=(request.transport, answer.transport),
            send_timeout=self._send_timeout,
        )
        self._streams.add(relay)  # from here on, end_streams() tells the relay itself
        try:
            await client.prepare(request)
        except BaseException:
            self._streams.discard(relay)
            relay.abandon()
            await upstream.close(code=GOING_AWAY)
            raise
        running = relay.start()
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client's connection is lost. The relay sees it too, closes
            # the upstream and counts the stream, and the stream's log line waits for that; a relay stuck on
            # the upstream is told.
            done, _ = await asyncio.wait((running,), timeout=CLOSE_REPLY_TIMEOUT)
            if not done:
                relay.client_lost()
                await asyncio.wait((running,))
            if not running.cancelled() and running.exception() is not None:
                log.error("websocket_relay_failed", request_id=ctx.request_id, exc_info=running.exception())
            raise
        except Exception:  # a bug: after the 101 no envelope can be sent, and the relay has closed both sides
            log.exception("websocket_relay_failed", request_id=ctx.request_id)
        finally:
            self._streams.discard(relay)
        return client

    async def _refusal(self, ctx: RequestContext, response: aiohttp.ClientResponse) -> web.Response:
        """The upstream's answer to an upgrade, when not a 101: an error normalized as any other upstream
        error is, anything else a 502."""
        route = ctx.route
        assert route is not None
        try:
            body = await within(route.idle_read_timeout, _read_bounded(response, self._max_error_body))
        except (aiohttp.ClientError, TimeoutError):
            body = None
        finally:
            response.close()
        if response.status < 400:  # a 200, or a redirect: a WebSocket client cannot follow either
            ctx.upstream_error = "protocol"
            raise GatewayError(_BAD_UPGRADE)
        return upstream_error_response(
            ctx, response.status, response.headers, body, fmt=self._fmt, max_body=self._max_error_body
        )

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
            except (UpgradeRefused, aiohttp.WSServerHandshakeError):
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
        with spans.span("upstream handshake", SpanKind.CLIENT) as span:
            try:
                return await self._upgrade(ctx, url, headers, protocols)
            finally:
                if span is not None:
                    describe_upstream_call(span, ctx)

    async def _upgrade(
        self, ctx: RequestContext, url: str, headers: list[tuple[str, str]], protocols: tuple[str, ...]
    ) -> aiohttp.ClientWebSocketResponse:
        route = ctx.route
        assert route is not None
        try:
            # The session has no total timeout (a stream lasts as long as it lasts), so the handshake is
            # bounded here: the route's connect plus response-headers time.
            upstream = await within(
                route.connect_timeout + route.response_headers_timeout,
                self._pool.session.ws_connect(
                    URL(url + ctx.target, encoded=True),
                    headers=headers,
                    protocols=protocols,
                    autoping=False,
                    autoclose=False,
                    max_msg_size=_aiohttp_limit(route.max_message_bytes),
                    decode_text=False,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_REPLY_TIMEOUT),
                ),
            )
        except (UpgradeRefused, aiohttp.WSServerHandshakeError):
            self._health.mark_reachable(url)  # it answered, if not with an upgrade
            raise
        self._health.mark_reachable(url)
        spans.answered(101)
        return upstream


def _aiohttp_limit(max_message_bytes: int) -> int:
    # aiohttp refuses a message of max_msg_size bytes itself; the setting names the largest one relayed.
    return max_message_bytes + 1 if max_message_bytes else 0


def _upgrade_response_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in end_to_end(headers.items()) if name.lower() not in _HANDSHAKE]


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """At most `limit` bytes of the body; None when there is more."""
    body = bytearray()
    while chunk := await response.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
