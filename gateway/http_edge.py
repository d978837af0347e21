"""The client-facing HTTP/1.1 connection: what aiohttp's server protocol does, plus what an edge proxy owes.

- Requests that aiohttp's parser rejects are answered in the envelope, not aiohttp's text/plain.
- Heads are screened by http_conformance before any request is made of them (HTTP versions, framing,
  Host, the absolute-form target), and a refusal closes the connection.
- A request head must arrive whole within `server.header_timeout`, else 408 and close: without it a client
  dribbling header bytes holds its connection for the whole keep-alive timeout.
- A body whose framing breaks after its head was accepted (a bad chunk size) fails the request reading it
  at once: llhttp drops that body silently, and the proxy would wait out `request_body_idle`.
- A client that takes none of a response for `server.send_timeout` is cut off: otherwise one that never
  reads holds its upstream connection for as long as it likes.

aiohttp has no hooks for these, so `EdgeParser` wraps the parser each connection already has; it relies on
the parser's `feed_data` contract and on `web_protocol._ErrInfo`, the marker aiohttp itself queues for a
request it could not parse. tests/test_edge.py fails if an aiohttp upgrade changes either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import _ErrInfo

from gateway.context import RequestContext
from gateway.envelope import ErrorFormat, ErrorInfo, gateway_error, render
from gateway.filters.observe import ObserveFilter
from gateway.http_conformance import Refused, conform, unsupported_version
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import new_request_id

log = structlog.get_logger("gateway.server")

_NOTHING: tuple[tuple[()], bool, bytes] = ((), False, b"")
BROKEN_BODY = gateway_error(
    400,
    "MALFORMED_REQUEST",
    "The request body is not validly framed.",
    headers={"Connection": "close"},
)


def parser_limits(max_uri_bytes: int, max_header_bytes: int) -> tuple[int, int]:
    """(max_line_size, max_field_size) for aiohttp's parser: the request target's limit, then one header
    line's. A LineTooLong carries the limit it broke (its args[1]), which is how protocol_error tells a long
    URI from a long header; so when the two are configured equal the field limit gets one byte more, which
    changes no answer because Admission enforces max_header_bytes on all header lines together anyway."""
    return max_uri_bytes, max_header_bytes + (max_header_bytes == max_uri_bytes)


def protocol_error(status: int, exc: BaseException | None, max_line_size: int) -> ErrorInfo:
    """The envelope for a request refused before it reached the filter chain; `max_line_size` is the
    parser's (see parser_limits)."""
    if isinstance(exc, Refused):
        return exc.error
    if isinstance(exc, LineTooLong) and exc.args[1] == max_line_size:
        return gateway_error(414, "URI_TOO_LONG")
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
        return gateway_error(431, "HEADERS_TOO_LARGE")
    if isinstance(exc, BadStatusLine) and "Invalid HTTP version" in str(exc):
        return unsupported_version().error  # llhttp knows HTTP/1.x, 0.9 and 2.0 only: HTTP/3.0, HTTP/1.2
    if status >= 500:
        return gateway_error(500, "INTERNAL")
    return gateway_error(status, "MALFORMED_REQUEST", "The request is not valid HTTP.")


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    error_format: ErrorFormat
    server_header: str
    header_timeout: float
    send_timeout: float
    observe: ObserveFilter


class EdgeParser:
    """One connection's request parser, screened: see the module docstring."""

    __slots__ = (
        "_body",
        "_closed",
        "_loop",
        "_parser",
        "_partial",
        "_pending",
        "_protocol",
        "_sized",
        "_timeout",
        "_timer",
    )

    def __init__(
        self,
        parser: Any,
        protocol: web.RequestHandler,
        header_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._parser = parser
        self._protocol = protocol
        self._timeout = header_timeout
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        """The body of the last head parsed: bytes fed while it is unfinished are body bytes."""
        self._sized = False
        """That body's length is known (Content-Length, not chunked): its end in a read can be found."""
        self._partial = False
        """Head bytes arrived that do not make a whole head yet."""
        self._pending: tuple[_ErrInfo, StreamReader] | None = None
        self._closed = False
        """A refusal was handed over: nothing after it on this connection is read."""

    def await_head(self) -> None:
        """Start the clock for a head that has not begun to arrive (a new connection's first request)."""
        self._timer = self._loop.call_later(self._timeout, self._head_overdue)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def feed_data(self, data: bytes) -> tuple[Any, bool, bytes]:
        if self._closed:
            pending, self._pending = self._pending, None
            return ([pending], False, b"") if pending is not None else _NOTHING
        body = self._body
        in_head = body is None or body.is_eof()
        received = 0 if body is None else body.total_bytes
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            if body is not None and not body.is_eof():
                self._break_body(body, exc)
                return _NOTHING
            self.stop()
            raise  # a head's error, answered by aiohttp (EdgeRequestHandler.handle_error)
        if not messages:
            if in_head:
                self._head_follows(data)
            elif body is not None and body.is_eof() and self._sized:
                # The body ended inside this read: what follows its last byte is the next head. (Behind a
                # chunked body, or a head and body that end in the read that began them, a next head is
                # not seen until more of it arrives; keepalive_timeout bounds a silent one meanwhile.)
                self._head_follows(data[body.total_bytes - received :])
            return messages, upgraded, tail
        self.stop()
        self._partial = False
        for index, (message, payload) in enumerate(messages):
            try:
                served = conform(message)
            except Refused as exc:
                del messages[index:]
                messages.append((_ErrInfo(status=exc.code, exc=exc, message=exc.message), EMPTY_PAYLOAD))
                self._closed = True
                return messages, False, b""
            if served is not message:
                messages[index] = (served, payload)
        message, self._body = messages[-1]
        self._sized = not message.chunked
        if self._body is EMPTY_PAYLOAD:  # pipelined: the next head may have begun in this same read
            self._head_follows(_after_last_head(data))
        return messages, upgraded, tail

    def _head_follows(self, rest: bytes) -> None:
        if rest.strip(b"\r\n"):  # empty lines before a request line are allowed (RFC 9112 §2.2)
            self._head_begun()

    def _head_begun(self) -> None:
        self._partial = True
        if self._timer is None:  # else counting since the connect: bytes never buy more time
            self._timer = self._loop.call_later(self._timeout, self._head_overdue)

    def _break_body(self, body: StreamReader, exc: HttpProcessingError) -> None:
        """The body being read lost its framing: the request reading it fails now, and the connection
        closes once it is answered (its bytes can no longer be told apart from a next request's)."""
        log.warning("bad_http_request", reason=BROKEN_BODY.reason, error=type(exc).__name__)
        body.set_exception(Refused(BROKEN_BODY))
        self._closed = True
        self._protocol.close()

    def _head_overdue(self) -> None:
        self._timer = None
        if not self._partial:  # nothing arrived: an idle new connection goes quietly
            self._protocol.force_close()
            return
        seconds = f"{self._timeout:g}"
        refusal = Refused(
            gateway_error(
                408, "REQUEST_TIMEOUT", f"The request head did not arrive within {seconds} seconds."
            )
        )
        self._pending = (_ErrInfo(status=408, exc=refusal, message=refusal.message), EMPTY_PAYLOAD)
        self._closed = True
        self._protocol.data_received(b"")  # hands the refusal over as the connection's next request

    # The rest of the parser's interface, as aiohttp's server protocol uses it.
    def feed_eof(self) -> Any:
        return self._parser.feed_eof()

    def pause_reading(self) -> None:
        self._parser.pause_reading()

    def message_consumed(self) -> None:
        self._parser.message_consumed()

    def set_upgraded(self, value: bool) -> None:
        self._parser.set_upgraded(value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


def _after_last_head(data: bytes) -> bytes:
    """What follows the last head terminator in `data` (a head cannot contain one); b"" when there is none."""
    crlf, lf = data.rfind(b"\r\n\r\n"), data.rfind(b"\n\n")
    end = max(crlf + 4 if crlf >= 0 else 0, lf + 2 if lf >= 0 else 0)
    return data[end:] if end else b""


class SendWatch:
    """Cuts a connection whose client takes none of what it is sent for `timeout` seconds (nginx's
    send_timeout), also once the response is done and only the transport's buffer is left to flush, which
    asyncio's close() would wait for without end. The transport's write limits are set so that asyncio
    pauses writing whenever any byte waits in its buffer: the watch runs only then, and costs nothing while
    the client keeps up. (A TLS transport's buffer holds what waits to be encrypted or sent: it fills once
    the TCP transport beneath holds 64 KiB.)"""

    __slots__ = ("_left", "_loop", "_timeout", "_timer", "_transport")

    def __init__(self, transport: asyncio.Transport, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        # TCP transports pause above the high-water mark, TLS ones (asyncio's and uvloop's) at it: 0 would
        # pause a TLS connection with nothing left to write, and its response would never finish.
        transport.set_write_buffer_limits(high=0 if transport.get_extra_info("sslcontext") is None else 1)
        self._transport = transport
        self._timeout = timeout
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._left = 0

    def paused(self) -> None:
        self._left = self._transport.get_write_buffer_size()
        self._timer = self._loop.call_later(self._timeout, self._overdue)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _overdue(self) -> None:
        self._timer = None
        if self._transport.get_write_buffer_size() < self._left:  # it took some: progress, not a stall
            self.paused()
            return
        peer = self._transport.get_extra_info("peername")
        log.warning("client_send_timeout", client_ip=peer[0] if peer else None, seconds=self._timeout)
        self._transport.abort()


class EdgeRequestHandler(web.RequestHandler):
    __slots__ = ("_edge", "_edge_parser", "_send_watch")

    def __init__(
        self, manager: web.Server, *, edge: EdgeSettings, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._edge = edge
        self._edge_parser = EdgeParser(self._parser, self, edge.header_timeout, loop)
        self._parser = self._edge_parser
        self._send_watch: SendWatch | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._send_watch = SendWatch(cast(asyncio.Transport, transport), self._edge.send_timeout, self._loop)
        self._edge_parser.await_head()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_watch is not None:
            self._send_watch.paused()

    def resume_writing(self) -> None:
        if self._send_watch is not None:
            self._send_watch.stop()
        super().resume_writing()

    def close_if_idle(self) -> None:
        # aiohttp keeps no public flag for this; tests/test_lifecycle.py's drain tests fail if it changes.
        if not self._request_in_progress:
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._edge_parser.stop()
        if self._send_watch is not None:
            self._send_watch.stop()
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp drains the unread body of an answered request; one that broke its framing meanwhile was
        # logged as it broke, and is the client's fault, not an unhandled exception with a traceback.
        if not isinstance(kwargs.get("exc_info"), Refused):
            super().log_exception(*args, **kwargs)

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
        edge = self._edge
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
            body=render(error, ctx.request_id, edge.error_format),
            content_type="application/json",
            headers={REQUEST_ID_HEADER: ctx.request_id, hdrs.SERVER: edge.server_header},
        )
        response.force_close()
        edge.observe.rejected(ctx, response)  # never reached the filter chain, so recorded here
        return response


class EdgeServer(web.Server):
    """aiohttp's low-level server, its connections handled by EdgeRequestHandler."""

    def __init__(self, handler: Callable[..., Any], *, edge: EdgeSettings, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._edge = edge

    def configure(self, edge: EdgeSettings, **kwargs: Any) -> None:
        """New settings (a config reload) for the connections opened from now on."""
        self._edge = edge
        self._kwargs.update(kwargs)

    def __call__(self) -> web.RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, edge=self._edge, **self._kwargs)

    def close_idle(self) -> None:
        """Close the connections with no request under way (draining); aiohttp's pre_shutdown() would also
        stop reading from the busy ones."""
        for connection in self.connections:
            if isinstance(connection, EdgeRequestHandler):
                connection.close_if_idle()
