"""One relayed WebSocket stream: messages, pings and pongs both ways as they come, then one close that both
sides see, and what the stream did (context.StreamStats and the stream metrics).

The pumps only report how their side ended; the relay stops both pumps before it closes anything, so that a
pending receive never sees a side closing and answers with a code of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from gateway.context import RequestContext, StreamStats
from gateway.observability import metrics
from gateway.routing import Route

log = structlog.get_logger("gateway.websocket")

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
    """One direction's counts: the stream's own, logged at its end, and the live metrics; and its writes
    (see _SendWatch)."""

    __slots__ = ("_bytes_metric", "_messages_metric", "bytes", "messages", "writes", "writing")

    def __init__(self, route: str, direction: str) -> None:
        self.messages = 0
        self.bytes = 0
        self.writes = 0
        """Frames written (or being written) so far, pings and pongs included."""
        self.writing = False
        self._messages_metric = metrics.WEBSOCKET_MESSAGES.labels(route, direction)
        self._bytes_metric = metrics.WEBSOCKET_BYTES.labels(route, direction)

    def count(self, size: int) -> None:
        self.messages += 1
        self.bytes += size
        self._messages_metric.inc()
        self._bytes_metric.inc(size)


async def _pump(source: Socket, sink: Socket, way: _Way, limit: int) -> _Closed | str:
    """Forward until the source closes (its close frame), sends what the gateway refuses, or is lost; or
    until the sink is lost. `limit`: the largest message relayed (0: any)."""
    while True:
        way.writing = False
        msg = await source.receive()
        kind = msg.type
        way.writing = True
        way.writes += 1
        try:
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                size = len(msg.data)
                if limit and size > limit:  # inflated past it (aiohttp's own check is on the way in)
                    return _Closed(MESSAGE_TOO_BIG, _TOO_BIG, "message_too_big")
                way.count(size)
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


class _SendWatch:
    """server.send_timeout towards the upstream, as the edge's SendWatch is towards clients: a write the
    upstream has taken none of for that long ends the stream (`stalled` is called). A timer looks every
    `timeout` seconds, so a stall is seen after one to two periods; nothing is done per message."""

    __slots__ = ("_last", "_loop", "_stalled", "_timeout", "_timer", "_transport", "_way")

    def __init__(
        self, way: _Way, transport: asyncio.BaseTransport, timeout: float, stalled: Callable[[], None]
    ) -> None:
        self._way = way
        self._transport = transport
        self._timeout = timeout
        self._stalled = stalled
        self._loop = asyncio.get_running_loop()
        self._last: tuple[int, int] | None = None
        """What the last look saw while a write waited: which write, and how far the upstream had taken."""
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(timeout, self._look)

    def _look(self) -> None:
        way = self._way
        now = (way.writes, _taken(self._transport)) if way.writing else None
        if now is not None and now == self._last:  # the same write waiting, and nothing taken meanwhile
            self._timer = None
            self._stalled()
            return
        self._last = now
        self._timer = self._loop.call_later(self._timeout, self._look)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _taken(transport: Any) -> int:
    """A count that grows whenever the peer takes bytes written to `transport`. On Linux, the bytes it has
    acknowledged (TCP_INFO): through TLS, and past the kernel's send queue, megabytes deep, which would hide a
    slow reader's progress from the transport's own buffer. Elsewhere, minus what that buffer holds."""
    sock = transport.get_extra_info("socket")
    if sock is not None and _TCP_INFO is not None:
        with contextlib.suppress(OSError, ValueError, struct.error):
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
            acked: int = struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0]
            return acked
    return -int(transport.get_write_buffer_size())


_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
# struct tcp_info (linux/tcp.h): 8 one-byte fields, 24 u32, then u64 pacing_rate, max_pacing_rate and
# bytes_acked (Linux 4.1 and later; the kernel only ever appends to it, and returns zeros where older).
_TCPI_BYTES_ACKED: Final = 8 + 24 * 4 + 2 * 8
_TCP_INFO_SIZE: Final = _TCPI_BYTES_ACKED + 8


class Relay:
    """A stream between `client` (after its 101) and `upstream`, run by start() in a task of its own: aiohttp
    cancels the handler when the client's connection is lost, and the upstream must still get its close. Its
    proxy keeps it while it runs, so that a stop or a reload can end it (going_away)."""

    def __init__(
        self,
        client: web.WebSocketResponse,
        upstream: aiohttp.ClientWebSocketResponse,
        ctx: RequestContext,
        *,
        transports: tuple[asyncio.BaseTransport | None, asyncio.BaseTransport | None],
        send_timeout: float,
    ) -> None:
        """`transports`: the client's connection and the upstream's, cut when a side does not answer a close
        (aiohttp's own close waits for unsent bytes to go out, which a peer that stopped reading never
        takes). `send_timeout`: how long the upstream may take none of a message (server.send_timeout)."""
        assert ctx.route is not None and ctx.upstream_target is not None
        self.route: Route = ctx.route
        self.target: str = ctx.upstream_target
        """The upstream URL the stream goes to: the route's, or the target its pool picked."""
        self._client = client
        self._upstream = upstream
        self._ctx = ctx
        self._client_transport, self._upstream_transport = transports
        self._send_timeout = send_timeout
        self._stats = StreamStats(opened=0.0)
        self._to_upstream = _Way(self.route.name, "to_upstream")
        self._to_client = _Way(self.route.name, "to_client")
        self._limit = self.route.max_message_bytes
        loop = asyncio.get_running_loop()
        self._ending: asyncio.Future[tuple[str, float]] = loop.create_future()
        self._closing: list[asyncio.Timeout] = []
        """The time limits of the sides' closes under way, which going_away() can shorten."""
        self.finished: asyncio.Future[None] = loop.create_future()
        """Done once the stream has ended, or was never started (abandon())."""

    def start(self) -> asyncio.Task[None]:
        """Once the client has its 101."""
        self._stats.opened = time.perf_counter()
        self._ctx.stream = self._stats
        return asyncio.create_task(self._run())

    def abandon(self) -> None:
        """The client's 101 could not be sent: there is no stream to relay."""
        self.finished.set_result(None)

    def going_away(self, why: str, within: float) -> None:
        """End the stream with 1001 to both sides (`why`: a key of GOING_AWAY_REASONS), each given up to
        `within` seconds (at most CLOSE_REPLY_TIMEOUT) to answer. A stream already closing is given no
        longer than that either."""
        within = min(within, CLOSE_REPLY_TIMEOUT)
        if not self._ending.done():
            self._ending.set_result((why, within))
        latest = asyncio.get_running_loop().time() + within
        for limit in self._closing:
            when = limit.when()
            if not limit.expired() and (when is None or when > latest):
                limit.reschedule(latest)

    def client_lost(self) -> None:
        """The client's connection is gone, and the pumps have not seen it: one blocked writing to an
        upstream that stopped reading never would. The upstream gets 1001."""
        if not self._ending.done():
            self._ending.set_result(("client_lost", CLOSE_REPLY_TIMEOUT))

    def _upstream_stalled(self) -> None:
        if not self._ending.done():
            log.warning("upstream_send_timeout", request_id=self._ctx.request_id, seconds=self._send_timeout)
            self._ending.set_result(("send_timeout", CLOSE_REPLY_TIMEOUT))

    async def _run(self) -> None:
        """Relay until one side closes or is lost, or the gateway ends the stream; then close both sides."""
        metrics.WEBSOCKET_CONNECTIONS.labels(self.route.name).inc()
        client, upstream = self._client, self._upstream
        to_upstream = asyncio.create_task(_pump(client, upstream, self._to_upstream, self._limit))
        watch = (
            _SendWatch(
                self._to_upstream, self._upstream_transport, self._send_timeout, self._upstream_stalled
            )
            if self._upstream_transport is not None
            else None
        )
        to_client = asyncio.create_task(_pump(upstream, client, self._to_client, self._limit))
        try:
            done, _ = await asyncio.wait(
                (to_upstream, to_client, self._ending), return_when=asyncio.FIRST_COMPLETED
            )
            if watch is not None:  # writes that wait from now on wait for the closes, which have limits
                watch.stop()
            # The client's reader is stopped here. The upstream's is left to aiohttp's close(), which ends a
            # pending receive and then waits for the upstream's answer; a cancelled receive would count as a
            # lost connection, and close() would not wait.
            to_upstream.cancel()
            [inbound] = await asyncio.gather(to_upstream, return_exceptions=True)
            # A side's own end is the more telling when the gateway was ending the stream at the same time.
            if to_upstream in done:
                await self._ended(inbound, from_client=True)
            elif to_client in done:
                [outbound] = await asyncio.gather(to_client, return_exceptions=True)
                await self._ended(outbound, from_client=False)
            else:
                why, within = self._ending.result()
                if why == "client_lost":
                    await self._close("client", ABNORMAL, b"", send=GOING_AWAY, reply_within=within)
                elif why == "send_timeout":
                    if self._upstream_transport is not None:  # it takes nothing: not even a close frame
                        self._upstream_transport.abort()
                    await self._close("gateway", INTERNAL_ERROR, b"", why=why, reply_within=within)
                else:
                    reason = GOING_AWAY_REASONS[why]
                    await self._close("gateway", GOING_AWAY, reason, why=why, reply_within=within)
        finally:
            if watch is not None:
                watch.stop()
            to_client.cancel()
            # Every pump's outcome is retrieved, an exception included: none is left "never retrieved".
            await asyncio.gather(to_client, return_exceptions=True)
            self._finish()

    async def _ended(self, outcome: object, *, from_client: bool) -> None:
        if isinstance(outcome, BaseException):  # a bug in the pump (expected failures are outcomes)
            raise outcome
        source, sink = ("client", "upstream") if from_client else ("upstream", "client")
        if isinstance(outcome, _Closed):
            if outcome.why is None:  # the source's own close frame: relayed as it came
                code = outcome.code
                sendable = 1000 <= code <= 4999 and code not in (NO_STATUS, ABNORMAL, 1015)
                await self._close(source, code, outcome.reason, send=code if sendable else NORMAL)
            else:  # the gateway refused what the source sent
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
        deadline = asyncio.get_running_loop().time() + reply_within
        await asyncio.gather(
            self._close_side(self._upstream, self._upstream_transport, code, reason, deadline),
            self._close_side(self._client, self._client_transport, code, reason, deadline),
        )

    async def _close_side(
        self, side: Socket, transport: asyncio.BaseTransport | None, code: int, reason: bytes, deadline: float
    ) -> None:
        if side.closed:
            return
        try:
            async with asyncio.timeout_at(deadline) as limit:
                self._closing.append(limit)
                try:
                    await side.close(code=code, message=reason)
                finally:
                    self._closing.remove(limit)
        except (TimeoutError, ConnectionError, aiohttp.ClientError):
            if transport is not None:
                transport.abort()  # nothing more can be said on it, and what it holds unsent is dropped

    def _finish(self) -> None:
        try:
            self._record()
        finally:
            self.finished.set_result(None)

    def _record(self) -> None:
        ctx, stats = self._ctx, self._stats
        ctx.bytes_in, ctx.bytes_out = self._to_upstream.bytes, self._to_client.bytes
        stats.messages_in, stats.messages_out = self._to_upstream.messages, self._to_client.messages
        route = self.route.name
        metrics.WEBSOCKET_CONNECTIONS.labels(route).dec()
        if stats.closed_by is None:  # ended by an error in the relay itself, or cancelled: cut both sides
            stats.closed_by, stats.close_code = "gateway", ABNORMAL
            for transport in (self._client_transport, self._upstream_transport):
                if transport is not None:
                    transport.abort()
        assert stats.close_code is not None
        label = metrics.close_code_label(stats.close_code)
        metrics.WEBSOCKET_CLOSES.labels(route, stats.closed_by, label).inc()
        metrics.WEBSOCKET_DURATION.labels(route).observe(time.perf_counter() - stats.opened)
