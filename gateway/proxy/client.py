"""The upstream HTTP/1.1 client: keep-alive pools of connections whose responses httptools parses.

Hand-written on purpose. The proxy used aiohttp's ClientSession, and benchmarks/ put it at 120-205 µs of CPU
per request, the largest stage of the gateway: a request object, a tracing-capable connector, a timer
context, a header multidict and a stream reader per call, and a second pass over every header on the way in
and out. This client does the one thing the proxy needs: write a request head (and its body) that the proxy
already built, parse the answer with httptools (llhttp, the parser uvicorn uses), and hand the body over in
chunks with flow control. With it (and the other changes of the "Fast path" issue) the pass-through gateway
went from 0.55x to 1.2x the naive aiohttp proxy's requests per second on the same 2-core box, the stage
itself to ~70 µs (benchmarks/README.md has the table).

What it keeps from aiohttp's client, each covered by tests/test_proxy.py:
- connect, response-header and idle-read timeouts (a timer per phase, armed only while that phase lasts);
- a pool per upstream origin with a total and a per-origin cap; waiting for a free connection counts against
  the connect timeout; idle connections are closed after keepalive_timeout;
- flow control both ways: the request body waits for the upstream to drain, the upstream socket stops being
  read while the client has not taken what was read;
- which connections were reused, so a request that meets a stale pooled connection can be sent again;
- HTTPS with certificate and host name verification, in the SSL context gateway/tls.py builds from the
  config (upstream.tls_verify, upstream.tls: a CA bundle, a client certificate).

WebSocket upgrades, introspection and JWKS calls keep aiohttp's client (proxy/upstream.py): they are rare
next to API requests, and aiohttp's WebSocket support is worth having.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, cast

import httptools
from opentelemetry.trace import SpanKind
from yarl import URL

from gateway.observability import spans

# The response head's limits, as aiohttp's client had them (max_line_size / max_field_size): an upstream
# answering beyond them is broken, and the client gets a 502 instead of a gateway holding its junk.
MAX_HEADER_LINE = 16384
MAX_HEADER_BYTES = 256 * 1024
# Read from the upstream no further ahead than this while the client has not taken it (aiohttp's
# read_bufsize was 64 KiB); reading resumes once the buffer is below a quarter of it.
READ_HIGH_WATER = 64 * 1024
READ_LOW_WATER = READ_HIGH_WATER // 4

FailureKind = Literal["connect", "timeout", "reset", "protocol"]
Body = AsyncIterator[bytes] | bytes | None
"""A request body: whole (written with the head), in chunks as they come, or none."""


class UpstreamError(Exception):
    """The upstream did not give a whole answer. `kind` is how operators name it; `reused` says the
    connection came from the pool (a failure before any response byte then means it had gone stale)."""

    kind: FailureKind = "reset"
    unsent: bool = False
    """Nothing of the request reached the upstream, so another target may take it even if it timed out."""
    local: bool = False
    """The gateway's own limits failed it (its connection pool, its file descriptors), not the upstream."""

    def __init__(self, message: str, *, reused: bool = False) -> None:
        super().__init__(message)
        self.reused = reused


class ConnectFailed(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError, TimeoutError):
    kind = "timeout"


class ConnectTimeout(UpstreamTimeout):
    """The upstream did not accept the connection in time (it drops SYNs, or the TLS handshake hangs)."""

    unsent = True


class PoolWaitTimeout(UpstreamTimeout):
    """No connection of the gateway's own pool became free in time: answered as a timeout, no upstream's."""

    local = True


class LocalConnectFailed(ConnectFailed):
    """A connection could not even be started: the gateway is out of file descriptors or buffers."""

    local = True


LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""What a connect fails with when the gateway's process or host, not the upstream, ran out of something."""


class ConnectionDropped(UpstreamError):
    kind = "reset"


class BadResponse(UpstreamError):
    kind = "protocol"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream URL's requests go: one pool per origin."""

    scheme: str
    host: str
    port: int
    host_header: str
    """What Host says when the route does not preserve the client's: host, and the port unless default."""
    base_path: str
    """The URL's path, put before every request target (an upstream may live under a prefix)."""

    @classmethod
    def parse(cls, url: str) -> Origin:
        parsed = URL(url)
        assert parsed.raw_host is not None and parsed.port is not None  # config.py validated the URL
        return cls(
            scheme=parsed.scheme,
            host=parsed.raw_host,
            port=parsed.port,
            host_header=parsed.host_port_subcomponent or parsed.raw_host,
            base_path=parsed.raw_path.rstrip("/"),
        )


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    response_headers: float
    idle_read: float


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One request as the upstream receives it, the same for every attempt (each sends its own body)."""

    origin: Origin
    head: bytes
    """The request line and headers, serialized."""
    timeouts: Timeouts
    chunked: bool
    """The body is chunk-encoded on the way (the client's had no Content-Length)."""
    head_request: bool
    """A HEAD: the response has no body, whatever its Content-Length says."""


class _Waiter:
    """A request waiting for the pool to have room (or a connection) for its origin."""

    __slots__ = ("future", "origin")

    def __init__(self, origin: Origin, future: asyncio.Future[_Connection | None]) -> None:
        self.origin = origin
        self.future = future


@dataclass(eq=False)
class UpstreamPool:
    """Every upstream connection of one gateway process, by origin."""

    max_connections: int
    max_per_origin: int  # 0: only the total applies
    keepalive_timeout: float
    ssl_context: ssl.SSLContext = field(default_factory=ssl.create_default_context)
    """For https:// origins (gateway/tls.py's upstream_context)."""
    _idle: dict[Origin, list[_Connection]] = field(default_factory=dict)
    _open: dict[Origin, int] = field(default_factory=dict)
    _total: int = 0
    _waiters: collections.deque[_Waiter] = field(default_factory=collections.deque)
    _sweep: asyncio.TimerHandle | None = None
    _closed: bool = False

    async def request(self, outgoing: Outgoing, body: Body) -> UpstreamResponse:
        """Send one request (a body as bytes goes out with the head, chunks are written as they come) and
        return once the response head is here."""
        connection = self._take_idle(outgoing.origin)  # the usual case, without a coroutine of its own
        if connection is None:
            connection = await self._acquire(outgoing.origin, outgoing.timeouts.connect)
        return await connection.exchange(outgoing, body)

    async def _acquire(self, origin: Origin, connect_timeout: float) -> _Connection:
        """A new connection, once there is room for one, or an idle one that a waiter was handed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        waited = False
        while not self._has_room(origin):
            if self._total >= self.max_connections and self._close_idle_elsewhere(origin):
                continue  # idle connections to another upstream give way
            handed = await self._wait_for_room(origin, deadline, again=waited)
            waited = True
            if handed is not None:
                return handed
            connection = self._take_idle(origin)
            if connection is not None:
                return connection
        self._count(origin, +1)
        connection = _Connection(self, origin)  # counted: it gives the room back once, however it ends
        try:
            where = {"server.address": origin.host, "server.port": origin.port}
            with spans.span("connect", SpanKind.CLIENT, where):
                async with asyncio.timeout_at(deadline):
                    await self._connect(connection)
        except BaseException as exc:
            connection.close()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"connecting to {origin.host}:{origin.port} took too long") from None
            raise
        return connection

    async def _wait_for_room(self, origin: Origin, deadline: float, *, again: bool) -> _Connection | None:
        """A connection handed over by release(), or None when room was made (try again). A waiter woken
        for nothing (another request took the room first) keeps its place at the front."""
        future: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(origin, future)
        if again:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                return await future
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                handed = future.result()  # given to us just as we gave up: pass it on
                if handed is not None:
                    self.release(handed)
                else:
                    self._wake_one()
            else:
                self._forget_waiter(waiter)
            if isinstance(exc, TimeoutError):
                raise PoolWaitTimeout("no pooled connection became free in time") from None
            raise

    async def _connect(self, connection: _Connection) -> None:
        origin = connection.origin
        tls = self.ssl_context if origin.scheme == "https" else None
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: connection,
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls is not None else None,
            )
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS with {origin.host}: {exc.reason or exc}") from exc
        except OSError as exc:
            failed = LocalConnectFailed if exc.errno in LOCAL_ERRNOS else ConnectFailed
            raise failed(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}") from exc

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        expired = idle[-1].loop.time() - self.keepalive_timeout
        while idle:
            connection = idle.pop()  # the most recently used: the others are left to expire
            if connection.idle_since > expired and connection.usable():
                return connection
            connection.close()
        return None

    def _close_idle_elsewhere(self, origin: Origin) -> bool:
        """Close the longest idle connection to another origin; False when there is none."""
        oldest: _Connection | None = None
        for other, idle in self._idle.items():
            if other != origin and idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.origin].pop(0)
        oldest.close()
        return True

    def _has_room(self, origin: Origin) -> bool:
        if self._total >= self.max_connections:
            return False
        return not self.max_per_origin or self._open.get(origin, 0) < self.max_per_origin

    def _count(self, origin: Origin, delta: int) -> None:
        self._total += delta
        self._open[origin] = self._open.get(origin, 0) + delta
        if delta < 0:
            self._wake_one()

    def _wake_one(self) -> None:
        """Room was made: the first waiter that can use it tries again (for an idle connection, or to open
        one). One still at its origin's own cap cannot, and stays where it is."""
        for waiter in self._waiters:
            if not waiter.future.done() and self._has_room(waiter.origin):
                self._waiters.remove(waiter)
                waiter.future.set_result(None)
                return

    def _forget_waiter(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def release(self, connection: _Connection) -> None:
        """A connection whose exchange ended cleanly: to the first waiter for its origin, else idle."""
        if self._closed or not connection.usable():
            connection.close()
            return
        for waiter in self._waiters:
            if waiter.origin == connection.origin and not waiter.future.done():
                self._waiters.remove(waiter)
                waiter.future.set_result(connection)
                return
        if self._waiters and self._total >= self.max_connections:
            connection.close()  # another origin waits for room: an idle connection here would hold it
            return
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        if self._sweep is None:
            self._schedule_sweep(connection.idle_since + self.keepalive_timeout)

    def room_freed(self, connection: _Connection) -> None:
        """The connection is gone (by either side), and gives its room back: called once per connection."""
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
        self._count(connection.origin, -1)

    def _schedule_sweep(self, when: float) -> None:
        self._sweep = asyncio.get_running_loop().call_at(when, self._close_expired)

    def _close_expired(self) -> None:
        self._sweep = None
        cutoff = asyncio.get_running_loop().time() - self.keepalive_timeout
        oldest: float | None = None
        for idle in list(self._idle.values()):
            # Oldest first: the list is in the order connections were released.
            while idle and idle[0].idle_since <= cutoff:
                idle.pop(0).close()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._schedule_sweep(oldest + self.keepalive_timeout)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in list(self._idle.values()):
            for connection in list(idle):
                connection.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(ConnectFailed("the gateway is shutting down"))


class UpstreamResponse:
    """The response head, and its body read chunk by chunk. Exactly one of release() or close() ends it."""

    __slots__ = ("_connection", "headers", "reason", "status")

    def __init__(self, connection: _Connection, status: int, reason: str, headers: list[tuple[str, str]]):
        self._connection = connection
        self.status = status
        self.reason = reason
        self.headers = headers
        """In the upstream's order and spelling, latin-1 decoded (so the bytes go back out unchanged)."""

    def header(self, name: str) -> str:
        """The first value of a header (name in lower case), or ""."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return ""

    @property
    def complete(self) -> bool:
        """The whole body is already here (read() then never waits)."""
        return self._connection.message_complete

    async def read(self) -> bytes:
        """The next part of the body: everything buffered so far, b"" at its end. Raises UpstreamError when
        the upstream fails or goes silent for the idle-read timeout."""
        return await self._connection.read()

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if it can carry another request."""
        self._connection.finish()

    def close(self) -> None:
        """Drop the connection (the response is abandoned halfway, or cut on purpose)."""
        self._connection.close()


class _Connection(asyncio.Protocol):
    """One upstream connection, one exchange at a time; httptools calls the on_* methods."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._counted = True  # its room in the pool, given back once (_give_back), however it ends
        self._connected = False
        self.idle_since = 0.0
        self._exchanges = 0
        self._busy = False
        # The exchange in progress.
        self._timeouts: Timeouts | None = None
        self._head_request = False
        self._status_text = b""
        self._head: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_received = 0  # bytes read while the head is incomplete (interim responses included)
        self._head_future: asyncio.Future[UpstreamResponse] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._got_bytes = False
        self._head_received = 0
        self.message_complete = False
        self._until_close = False  # a body delimited by the connection's end (no length, not chunked)
        self._reusable = True
        self._writer: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_kind: Literal["headers", "idle"] | None = None
        self._last_read = 0.0  # when the phase began, or (idle phase) when its last byte arrived

    # --- the pool's side --------------------------------------------------------------------------------

    def usable(self) -> bool:
        transport = self._transport
        return self._connected and self._reusable and transport is not None and not transport.is_closing()

    async def exchange(self, outgoing: Outgoing, body: Body) -> UpstreamResponse:
        """Write the request and wait for the response head. A body in bytes goes out with the head; chunks
        are written by a task of their own as they come, since the answer may start before they end."""
        transport = self._transport
        assert transport is not None
        head, chunked = outgoing.head, outgoing.chunked
        self._begin(outgoing.timeouts, outgoing.head_request)
        future = self._head_future = self.loop.create_future()
        if body is None:
            transport.write(head)
            self._arm("headers")
        elif isinstance(body, bytes):
            if chunked:  # an empty chunk would itself be the last-chunk: not written
                body = (_chunk(body) if body else b"") + _LAST_CHUNK
            transport.write(head + body)
            self._arm("headers")
        else:
            transport.write(head)
            self._writer = self.loop.create_task(self._write_body(body, chunked))
        try:
            return await future
        except BaseException:
            self.close()
            raise

    def _begin(self, timeouts: Timeouts, head_request: bool) -> None:
        self._busy = True
        self._exchanges += 1
        self._timeouts = timeouts
        self._head_request = head_request
        self._chunks.clear()
        self._buffered = 0
        self._error = None
        self._got_bytes = False
        self._head_received = 0
        self.message_complete = False
        self._until_close = False

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            async for chunk in body:
                if self._error is not None or transport.is_closing():
                    return
                if chunk:
                    transport.write(_chunk(chunk) if chunked else chunk)
                    if self._write_paused:
                        await self._drained()
            if self._error is None and not transport.is_closing():
                if chunked:
                    transport.write(_LAST_CHUNK)
                if self._head_future is not None:  # the response-head timeout runs from the full request
                    self._arm("headers")
        except Exception as exc:  # the client's body failed (a refusal, a stall): this request is over
            self._fail(ConnectionDropped(f"the request body failed: {type(exc).__name__}"))
            self.close()

    async def _drained(self) -> None:
        """Wait for the upstream to take what was written; one that takes nothing for idle_read seconds is
        as silent as one that sends nothing, and the request fails the same way."""
        waiter = self._drain_waiter = self.loop.create_future()
        assert self._timeouts is not None
        try:
            async with asyncio.timeout(self._timeouts.idle_read):
                await waiter
        except TimeoutError:
            idle = self._timeouts.idle_read
            self._fail(UpstreamTimeout(f"the upstream took none of the request body for {idle:g} seconds"))
            self.close()

    def finish(self) -> None:
        """The proxy is done with the response: reuse the connection if the exchange ended cleanly."""
        self._disarm()
        self._busy = False
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            self.close()  # the upstream answered without taking the whole body: the connection is spent
            return
        if not (self.message_complete and self._error is None and not self._chunks and self.usable()):
            self.close()  # also when the body was not all read: the proxy stopped, the client left
            return
        if self._reading_paused:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        self._pool.release(self)

    def close(self) -> None:
        """Drop the connection now: abort(), not close(), which would wait for an upstream that has stopped
        reading to take the rest of the request first."""
        self._cancel_timer()
        self._busy = False
        self._reusable = False
        transport = self._transport
        if transport is not None:
            transport.abort()
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
        if self._error is None and not self.message_complete:
            self._fail(ConnectionDropped("the exchange was abandoned"))
        # Not left to connection_lost: uvloop never calls it for a transport closed while being opened.
        self._give_back()

    def _give_back(self) -> None:
        if self._counted:
            self._counted = False
            self._pool.room_freed(self)

    # --- the body, for UpstreamResponse ---------------------------------------------------------------

    async def read(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._reading_paused:
                    self._reading_paused = False
                    if self._transport is not None:
                        self._transport.resume_reading()
                    self._arm("idle")
                return data
            if self._error is not None:
                raise self._error
            if self.message_complete:
                return b""
            waiter = self._body_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._body_waiter = None

    # --- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self._connected = True

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            # Bytes while no request is out: an upstream talking out of turn cannot be trusted with another.
            self.close()
            return
        self._got_bytes = True
        if self._head_future is not None:
            self._head_received += len(data)
        if self._timer_kind == "idle":
            self._last_read = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the upstream switched protocols unasked"))
            self.close()
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(
                cause if isinstance(cause, UpstreamError) else BadResponse(f"unparsable response: {exc}")
            )
            self.close()
            return
        if self._head_future is not None and self._head_received > MAX_HEADER_BYTES:
            # httptools holds a header until it ends: an endless one would otherwise grow without limit.
            self._fail(BadResponse("the response head is too large"))
            self.close()
        elif self._head_future is None and self._busy:
            if self.message_complete:
                if self._head_request:
                    # llhttp cannot be told a response answers a HEAD (no body whatever its length says): the
                    # exchange ended at its head, and the next one starts on a fresh parser.
                    self._parser = httptools.HttpResponseParser(self)
            elif self._timer_kind is None and not self._reading_paused:
                self._arm("idle")

    def eof_received(self) -> bool | None:
        return None  # close the transport: an HTTP/1.1 upstream that half-closes is done

    def connection_lost(self, exc: Exception | None) -> None:
        self._connected = False
        self._cancel_timer()
        if self._busy and self._error is None and not self.message_complete:
            if self._until_close and self._head_future is None and exc is None:
                self._complete()  # the end of a body without a length is the end of the connection
            else:
                answering = self._head_future is not None
                self._fail(
                    ConnectionDropped(
                        "the upstream closed the connection "
                        + ("before answering" if answering else "mid-body"),
                        reused=answering and self._exchanges > 1 and not self._got_bytes,
                    )
                )
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)
        self._give_back()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- httptools ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head_future is None:
            raise BadResponse("a response nobody asked for")
        self._status_text = b""
        self._head = []
        self._head_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._status_text += status
        if len(self._status_text) > MAX_HEADER_LINE:
            raise BadResponse("the response's status line is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._head_bytes += size
        if size > MAX_HEADER_LINE or self._head_bytes > MAX_HEADER_BYTES:
            raise BadResponse("the response head is too large")
        self._head.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # an interim response (103 Early Hints, a stray 100): the real one follows
        future = self._head_future
        assert future is not None  # on_message_begin saw to it
        self._head_future = None
        self._disarm()
        if not self._parser.should_keep_alive():
            self._reusable = False
        if self._head_request:
            self.message_complete = True
        elif status not in (204, 304) and _ends_with_connection(self._head):
            self._until_close = True
            self._reusable = False
        if not future.done():
            response = UpstreamResponse(self, status, self._status_text.decode("latin-1").strip(), self._head)
            future.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._head_request:
            self._reusable = False  # a body after a HEAD's head: this upstream's framing cannot be trusted
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered >= READ_HIGH_WATER and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
            self._disarm()  # the client is slow, not the upstream: no idle-read timer while paused
        self._wake()

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() >= 200:  # an interim response's end is not the answer's
            self._complete()

    def _complete(self) -> None:
        self.message_complete = True
        self._disarm()
        self._wake()

    # --- failures and timers --------------------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self._error is not None:
            return
        if self.message_complete and self._head_future is None:
            self._reusable = False  # the answer arrived whole: what came after only retires the connection
            return
        self._error = error
        future, self._head_future = self._head_future, None
        if future is not None and not future.done():
            future.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self, kind: Literal["headers", "idle"]) -> None:
        """Start the phase's clock. The timer itself is lazy: one that is already set and due no later is
        left alone (it checks the phase when it fires), so a busy kept-alive connection sets one timer per
        timeout period instead of setting and cancelling one per request."""
        timeouts = self._timeouts
        if timeouts is None or self.message_complete or self._error is not None:
            return
        now = self._last_read = self.loop.time()
        self._timer_kind = kind
        due = now + (timeouts.response_headers if kind == "headers" else timeouts.idle_read)
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self._timer.cancel()
        self._timer_at = due
        self._timer = self.loop.call_at(due, self._timed_out)

    def _disarm(self) -> None:
        self._timer_kind = None  # a timer still set finds no phase to time, and goes

    def _cancel_timer(self) -> None:
        self._timer_kind = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        kind, timeouts = self._timer_kind, self._timeouts
        if kind is None or timeouts is None:
            return
        # The phase's clock: from when it began, and for the idle phase from the last byte read.
        due = self._last_read + (timeouts.idle_read if kind == "idle" else timeouts.response_headers)
        if due > self.loop.time():
            self._timer_at = due
            self._timer = self.loop.call_at(due, self._timed_out)
            return
        if kind == "idle":
            error = UpstreamTimeout(f"no response bytes for {timeouts.idle_read:g} seconds")
        else:
            error = UpstreamTimeout(f"no response head within {timeouts.response_headers:g} seconds")
        self._timer_kind = None
        self._fail(error)
        self.close()


def _ends_with_connection(head: list[tuple[str, str]]) -> bool:
    """The body runs until the upstream closes: no length, and no chunked coding last (RFC 9112 §6.3)."""
    length = False
    for name, value in head:
        lower = name.lower()
        if lower == "transfer-encoding":
            return value.rpartition(",")[2].strip().lower() != "chunked"
        if lower == "content-length":
            length = True
    return not length


_LAST_CHUNK = b"0\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)
