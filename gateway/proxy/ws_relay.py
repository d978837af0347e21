"""One relayed WebSocket stream: messages, pings and pongs both ways as they come, then one close that both
sides see, and what the stream did (context.StreamStats and the stream metrics).

The pumps only report how their side ended; the relay stops both pumps before it closes anything, so that a
pending receive never sees a side closing and answers with a code of its own.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from gateway.context import RequestContext, StreamStats
from gateway.observability import metrics
from gateway.routing import Route

NORMAL: Final = 1000
GOING_AWAY: Final = 1001
NO_STATUS: Final = 1005  # recorded, never sent: the close frame had no code
ABNORMAL: Final = 1006  # recorded, never sent: the connection ended without a close frame
MESSAGE_TOO_BIG: Final = 1009
INTERNAL_ERROR: Final = 1011
CLOSE_REPLY_TIMEOUT: Final = 5.0
"""How long a side gets to answer the gateway's close frame before its connection is cut."""
_TOO_BIG: Final = b"message too big"
GOING_AWAY_REASONS: Final = {"shutdown": b"gateway shutting down", "reload": b"route reconfigured"}


def _with_reason(code: int, message: bytes) -> bytes:
    return message or (_TOO_BIG if code == MESSAGE_TOO_BIG else b"")


class ClientSide(web.WebSocketResponse):
    """aiohttp closes a side whose message is over max_msg_size with 1009 and no reason: this one says why."""

    async def close(self, *, code: int = NORMAL, message: bytes = b"", drain: bool = True) -> bool:
        return await super().close(code=code, message=_with_reason(code, message), drain=drain)


class UpstreamSide(aiohttp.ClientWebSocketResponse):
    """The upstream's end of a stream (the WebSocket session's ws_response_class): see ClientSide."""

    async def close(self, *, code: int = NORMAL, message: bytes = b"") -> bool:
        return await super().close(code=code, message=_with_reason(code, message))


Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


@dataclass(frozen=True, slots=True)
class _Closed:
    """The source's close frame, or the gateway's refusal of what it sent (`why`)."""

    code: int
    reason: bytes
    why: str | None = None


_SOURCE_LOST: Final = "source_lost"
_SINK_LOST: Final = "sink_lost"


class _Way:
    """One direction's counts: the stream's own, logged at its end, and the live metrics."""

    __slots__ = ("_bytes_metric", "_messages_metric", "bytes", "messages")

    def __init__(self, route: str, direction: str) -> None:
        self.messages = 0
        self.bytes = 0
        self._messages_metric = metrics.WEBSOCKET_MESSAGES.labels(route, direction)
        self._bytes_metric = metrics.WEBSOCKET_BYTES.labels(route, direction)

    def count(self, size: int) -> None:
        self.messages += 1
        self.bytes += size
        self._messages_metric.inc()
        self._bytes_metric.inc(size)


async def _pump(source: Socket, sink: Socket, way: _Way) -> _Closed | str:
    """Forward until the source closes (its close frame), sends what the gateway refuses, or is lost; or
    until the sink is lost."""
    while True:
        msg = await source.receive()
        kind = msg.type
        try:
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                way.count(len(msg.data))
                await sink.send_frame(msg.data, kind)  # text as bytes (decode_text=False): never re-encoded
            elif kind is WSMsgType.PING:
                await sink.ping(msg.data)
            elif kind is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif kind is WSMsgType.CLOSE:
                return _Closed(msg.data or NO_STATUS, (msg.extra or "").encode())
            elif kind is WSMsgType.ERROR and isinstance(msg.data, WebSocketError):
                # aiohttp has closed the source with this code already: a message over max_msg_size (1009)
                # or a frame that breaks the protocol (1002, 1007).
                code = msg.data.code
                why = "message_too_big" if code == MESSAGE_TOO_BIG else "protocol_error"
                return _Closed(code, _with_reason(code, b""), why)
            else:  # CLOSING, CLOSED (the connection ended without a close frame), or another ERROR
                return _SOURCE_LOST
        except (ConnectionError, aiohttp.ClientError):
            return _SINK_LOST


class Relay:
    """A stream between `client` (after its 101) and `upstream`. Its proxy keeps it while it runs, so that a
    stop or a reload can end it (going_away)."""

    def __init__(
        self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, ctx: RequestContext
    ) -> None:
        assert ctx.route is not None
        self.route: Route = ctx.route
        self._client = client
        self._upstream = upstream
        self._ctx = ctx
        self._stats = ctx.stream = StreamStats(opened=time.perf_counter())
        self._to_upstream = _Way(self.route.name, "to_upstream")
        self._to_client = _Way(self.route.name, "to_client")
        self._going_away: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()

    def going_away(self, why: str, timeout: float) -> None:
        """End the stream with 1001 to both sides (`why`: a key of GOING_AWAY_REASONS), each given up to
        `timeout` seconds (at most CLOSE_REPLY_TIMEOUT) to answer."""
        if not self._going_away.done():
            self._going_away.set_result((why, min(timeout, CLOSE_REPLY_TIMEOUT)))

    async def run(self) -> None:
        """Relay until one side closes or is lost, or the gateway ends the stream; then close both sides.
        Run in a task of its own (see WebSocketProxy): aiohttp cancels the handler when the client's
        connection is lost, and the upstream must still get its close."""
        route = self.route.name
        metrics.WEBSOCKET_CONNECTIONS.labels(route).inc()
        client, upstream = self._client, self._upstream
        to_upstream = asyncio.create_task(_pump(client, upstream, self._to_upstream))
        to_client = asyncio.create_task(_pump(upstream, client, self._to_client))
        try:
            done, _ = await asyncio.wait(
                (to_upstream, to_client, self._going_away), return_when=asyncio.FIRST_COMPLETED
            )
            for pump in (to_upstream, to_client):
                pump.cancel()
            # Every pump's outcome is retrieved, an exception included: none is left "never retrieved".
            outcomes = await asyncio.gather(to_upstream, to_client, return_exceptions=True)
            if self._going_away in done:
                why, within = self._going_away.result()
                reason = GOING_AWAY_REASONS[why]
                await self._close("gateway", GOING_AWAY, reason, why=why, reply_within=within)
            elif to_upstream in done:
                await self._ended(outcomes[0], from_client=True)
            else:
                await self._ended(outcomes[1], from_client=False)
        finally:
            self._finish()

    async def _ended(self, outcome: object, *, from_client: bool) -> None:
        source, sink = ("client", "upstream") if from_client else ("upstream", "client")
        if isinstance(outcome, _Closed):
            if outcome.why is None:  # the source's own close frame: relayed as it came
                code = outcome.code
                sendable = 1000 <= code <= 4999 and code not in (NO_STATUS, ABNORMAL, 1015)
                await self._close(source, code, outcome.reason, send=code if sendable else NORMAL)
            else:  # the gateway refused what the source sent, and aiohttp has closed the source with the code
                lost = GOING_AWAY if from_client else INTERNAL_ERROR
                send = outcome.code if outcome.why == "message_too_big" else lost
                await self._close("gateway", outcome.code, outcome.reason, why=outcome.why, send=send)
            return
        # Lost without a close frame (or failed while written to): the other side hears that its peer went
        # away (the client) or that the gateway could not go on (the upstream).
        lost = source if outcome != _SINK_LOST else sink
        await self._close(lost, ABNORMAL, b"", send=GOING_AWAY if lost == "client" else INTERNAL_ERROR)

    async def _close(
        self,
        closed_by: str,
        code: int,
        reason: bytes,
        *,
        why: str | None = None,
        send: int | None = None,
        reply_within: float = CLOSE_REPLY_TIMEOUT,
    ) -> None:
        """Record how the stream ended, then close both sides with `send` (else `code`), concurrently. A side
        that closed already is left as it is; one that does not answer within `reply_within` seconds is cut
        off."""
        stats = self._stats
        stats.closed_by, stats.close_code, stats.close_reason = closed_by, code, why
        code = code if send is None else send
        await asyncio.gather(
            *(_close(side, code, reason, reply_within) for side in (self._upstream, self._client))
        )

    def _finish(self) -> None:
        ctx, stats = self._ctx, self._stats
        ctx.bytes_in, ctx.bytes_out = self._to_upstream.bytes, self._to_client.bytes
        stats.messages_in, stats.messages_out = self._to_upstream.messages, self._to_client.messages
        route = self.route.name
        metrics.WEBSOCKET_CONNECTIONS.labels(route).dec()
        if stats.closed_by is None:  # ended by an error in the relay itself, or cancelled
            stats.closed_by, stats.close_code = "gateway", ABNORMAL
        assert stats.close_code is not None
        label = metrics.close_code_label(stats.close_code)
        metrics.WEBSOCKET_CLOSES.labels(route, stats.closed_by, label).inc()
        metrics.WEBSOCKET_DURATION.labels(route).observe(time.perf_counter() - stats.opened)


async def _close(side: Socket, code: int, reason: bytes, reply_within: float) -> None:
    if side.closed:
        return
    try:
        async with asyncio.timeout(reply_within):
            await side.close(code=code, message=reason)
    except (TimeoutError, ConnectionError, aiohttp.ClientError):
        pass  # aiohttp has closed the connection: nothing more can be said on it
