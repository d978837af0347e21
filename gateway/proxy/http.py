"""Forward one HTTP request and stream the answer back; upstream errors come back as envelopes.

Large bodies are never buffered whole: a request body is read ahead only up to the route's
request_buffer_bytes before the upstream is contacted (so a slow client does not hold an upstream
connection for a small one), then flows from the client's stream into the upstream connection, and the
response body the other way, with flow control pausing whichever side is faster (proxy/client.py). What
has been read of the request body is kept until the response headers arrive, so that an idempotent request
with a small body can be sent again (see RequestBody and upstream.Resends); only what was read ahead is
kept for any other request, which the first try sends from there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import structlog
from aiohttp import web
from opentelemetry.trace import SpanKind

from gateway.context import RequestContext
from gateway.cors import take_over_upstream_cors
from gateway.envelope import ErrorFormat, ErrorInfo, gateway_error
from gateway.filters.errors import GatewayError
from gateway.forwarding import end_to_end
from gateway.health import UpstreamHealth
from gateway.http_conformance import Refused, expects_continue
from gateway.observability import spans
from gateway.proxy.client import Origin, Outgoing, Timeouts, UpstreamError, UpstreamPool, UpstreamResponse
from gateway.proxy.error_response import upstream_error_response
from gateway.proxy.targets import NoTarget, Tries, UpstreamTargets
from gateway.proxy.upstream import (
    UpstreamFailure,
    classify,
    describe_upstream_call,
    parent_of_upstream,
    send,
    upstream_headers,
)
from gateway.routing import IDEMPOTENT_METHODS, Route

log = structlog.get_logger("gateway.proxy")

# Replaced by the gateway on error responses it rewrites.
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REPLAY_BYTES = 64 * 1024
"""An idempotent request's body is kept while no larger than this, so that it can be sent again; API bodies
are small JSON, and a larger one streams through unkept (its request is then never re-sent)."""


class RequestBody:
    """The client's body as the upstream request's payload: counted against the route's limit, held to the
    route's pace (each read within request_body_idle, the whole at least min_body_rate after the grace
    period), and kept while small for a re-send.

    A limit, a stall or a broken framing raises GatewayError inside the upstream client's body writer, which
    fails the exchange as a dropped connection; `refusal` is how the proxy tells that apart from an upstream
    failure.
    """

    __slots__ = (
        "_abort",
        "_buffer_bytes",
        "_ended",
        "_grace",
        "_held",
        "_held_bytes",
        "_hold_limit",
        "_idle",
        "_limit",
        "_min_rate",
        "_reading",
        "_stream",
        "_waited",
        "received",
        "refusal",
    )

    def __init__(self, stream: aiohttp.StreamReader, route: Route, *, hold_limit: int) -> None:
        self._stream = stream
        self._limit = route.max_body_bytes
        self._idle = route.request_body_idle_timeout
        self._min_rate = route.min_body_rate
        self._grace = route.min_body_rate_grace
        self._buffer_bytes = route.request_buffer_bytes
        self._hold_limit = hold_limit
        self._held: list[bytes] | None = []  # every chunk read so far, in order; None once one was not kept
        self._held_bytes = 0
        # A failed attempt's iterator can still be parked in readany() until its cancellation lands; the
        # next attempt waits for it instead of breaking the stream's one-reader rule.
        self._reading = asyncio.Lock()
        self._abort: Callable[[], None] | None = None
        self._waited = 0.0
        """Seconds spent waiting for the client's bytes (not for the upstream, nor for a pool connection)."""
        self._ended = False
        self.received = 0
        self.refusal: ErrorInfo | None = None

    @property
    def replayable(self) -> bool:
        """Everything read from the client so far is still here, within the replay limit, so the request
        can be sent again."""
        return self._held is not None and self._held_bytes <= self._hold_limit

    async def prefetch(self) -> None:
        """Read the body before an upstream connection is taken: all of it when it ends within the route's
        request_buffer_bytes, else that much (at least one chunk). A client that uploads slowly, or stalls
        before its first byte, so never holds an upstream connection for a small body, and a pooled
        connection is written to as soon as it is taken, leaving it no time to go stale in between. The
        first attempt sends these bytes from the store, so they are kept even past the replay limit (the
        request is then simply not replayable)."""
        held = self._held
        assert held is not None
        while chunk := await self._receive():
            held.append(chunk)
            self._held_bytes += len(chunk)
            if self._held_bytes >= self._buffer_bytes:
                return
        self._ended = True

    def payload(self) -> bytes | AsyncIterator[bytes]:
        """One attempt's payload: the whole body when prefetch read all of it (it then goes out with the
        request head), else the chunks as they come."""
        if self._ended and self._held is not None:
            return b"".join(self._held)
        return self.chunks()

    def response_started(self, abort: Callable[[], None]) -> None:
        """Nothing will be sent again, so nothing more is kept. A refusal from now on calls `abort` to end
        the upstream request: aiohttp fails only a response still waiting for its headers."""
        self._held = None
        self._abort = abort
        if self.refusal is not None:
            abort()

    async def chunks(self) -> AsyncIterator[bytes]:
        """One attempt's payload: what earlier attempts (or prefetch) read, then the rest of the stream."""
        for chunk in tuple(self._held or ()):
            yield chunk
        while chunk := await self._receive():
            self._hold(chunk)
            yield chunk

    def _hold(self, chunk: bytes) -> None:
        if self._held is not None and self._held_bytes + len(chunk) <= self._hold_limit:
            self._held.append(chunk)
            self._held_bytes += len(chunk)
        else:
            self._held = None

    async def _receive(self) -> bytes:
        timeout, paced = self._idle, False
        if self._min_rate:
            # Apache's mod_reqtimeout rule: each min_body_rate bytes received buy one more second.
            allowed = self._grace + self.received / self._min_rate - self._waited
            if allowed < timeout:
                timeout, paced = allowed, True
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout), self._reading:
                chunk = await self._stream.readany()
            self._waited += time.monotonic() - started
        except TimeoutError:
            if paced:
                message = f"The request body arrived slower than {self._min_rate} bytes per second."
            else:
                message = f"No request body bytes arrived for {self._idle:g} seconds."
            raise self._refuse(gateway_error(408, "REQUEST_TIMEOUT", message)) from None
        except Refused as exc:  # its framing broke (http_edge)
            raise self._refuse(exc.error) from None
        self.received += len(chunk)
        if self.received > self._limit:
            message = f"The request body exceeds {self._limit} bytes."
            raise self._refuse(gateway_error(413, "REQUEST_TOO_LARGE", message))
        return chunk

    def _refuse(self, error: ErrorInfo) -> GatewayError:
        self.refusal = error
        if self._abort is not None:  # soon, not from inside the client's body writer, which it cancels
            asyncio.get_running_loop().call_soon(self._abort)
        return GatewayError(error)


class _ProxiedResponse(web.StreamResponse):
    """aiohttp writes a StreamResponse's head at prepare() and each body chunk in a send of its own; held
    back (as web.Response does for its body), the head goes out with the first chunk, so a small response
    is one send. Used only when that chunk is already here: a slow stream's head is not delayed."""

    _send_headers_immediately = False


class HttpProxy:
    def __init__(
        self,
        pool: UpstreamPool,
        health: UpstreamHealth,
        targets: UpstreamTargets,
        *,
        error_format: ErrorFormat,
        max_error_body_bytes: int,
    ) -> None:
        self._pool = pool
        self._health = health
        self._targets = targets
        self._fmt = error_format
        self._max_error_body = max_error_body_bytes
        self._timeouts: dict[str, Timeouts] = {}
        self._origins: dict[str, Origin] = {}

    async def __call__(self, request: web.BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        route = ctx.route
        assert route is not None
        idempotent = request.method in IDEMPOTENT_METHODS
        body = (
            RequestBody(request.content, route, hold_limit=_REPLAY_BYTES if idempotent else 0)
            if request.body_exists
            else None
        )
        tries = self._targets.tries(route.pool) if route.pool is not None else None
        try:
            if body is not None:
                if expects_continue(request):  # only now: authenticated, within its limits, welcome
                    await request.writer.write(_CONTINUE)
                await body.prefetch()
            with spans.span("upstream", SpanKind.CLIENT) as span:
                if span is not None:
                    parent_of_upstream(ctx, span)
                try:
                    return await self._forward(request, ctx, route, body, tries, idempotent=idempotent)
                finally:
                    if span is not None:
                        describe_upstream_call(span, ctx)
        finally:
            if tries is not None:  # least_request counts the request until here
                tries.done()
            if body is not None:  # the upload may go on after the response headers
                ctx.bytes_in = body.received

    async def _forward(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        route: Route,
        body: RequestBody | None,
        tries: Tries | None,
        *,
        idempotent: bool,
    ) -> web.StreamResponse:
        sent_at = time.perf_counter()
        upstream = await self._send(request, ctx, route, body, tries, idempotent=idempotent)
        ctx.upstream_seconds = time.perf_counter() - sent_at
        spans.answered(upstream.status)  # the upstream's time to first byte, on its span
        target = ctx.upstream_target
        assert target is not None  # _send named the target that answered
        self._health.mark_reachable(target)
        if body is not None:
            body.response_started(abort=upstream.close)
        try:
            if upstream.status >= 400:
                return await self._error_response(ctx, upstream)
            return await self._stream_response(request, ctx, route, upstream, body)
        finally:
            upstream.release()

    async def _send(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        route: Route,
        body: RequestBody | None,
        tries: Tries | None,
        *,
        idempotent: bool,
    ) -> UpstreamResponse:
        """The response head, from the route's upstream or from the targets of its pool (`tries`)."""
        attempt: Callable[[], Awaitable[UpstreamResponse]]
        if tries is None:
            outgoing = self._outgoing(request, ctx, route, route.upstream, body)
            ctx.upstream_target = route.upstream

            def attempt() -> Awaitable[UpstreamResponse]:
                # Each try replays what was kept of the body.
                return self._pool.request(outgoing, body.payload() if body is not None else None)

        else:
            attempt = self._pool_attempt(request, ctx, route, body, tries)

        def resent(failure: UpstreamFailure, why: str) -> None:
            spans.event("retry", {"error.type": failure.kind, "gateway.retry.reason": why})
            log.info(
                "upstream_retry",
                request_id=ctx.request_id,
                route=route.name,
                kind=failure.kind,
                why=why,
                upstream_target=ctx.upstream_target,
            )

        try:
            return await send(
                attempt,
                retries=route.retries,
                idempotent=idempotent,
                # A body refused mid-upload (limit, stall) is never sent again.
                replayable=lambda: body is None or (body.refusal is None and body.replayable),
                on_resend=resent,
                failover=tries is not None,
            )
        except UpstreamError as exc:
            if body is not None and body.refusal is not None:
                raise GatewayError(body.refusal) from None
            raise self._failed(ctx, route, classify(exc), exc) from None
        except NoTarget as exc:
            assert tries is not None
            raise self._failed(ctx, route, tries.exhausted(), tries.last_error or exc) from None

    def _pool_attempt(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        route: Route,
        body: RequestBody | None,
        tries: Tries,
    ) -> Callable[[], Awaitable[UpstreamResponse]]:
        """One try at a time, each to the target the pool picks for it (another one for a retry while one is
        usable), its outcome reported to the pool."""

        async def attempt() -> UpstreamResponse:
            url = ctx.upstream_target = tries.next()
            outgoing = self._outgoing(request, ctx, route, url, body)
            try:
                response = await self._pool.request(outgoing, body.payload() if body is not None else None)
            except UpstreamError as exc:
                if body is not None and body.refusal is not None:
                    tries.done()  # the client's upload failed it, not the target
                else:
                    tries.failed(exc)
                raise
            tries.answered()
            return response

        return attempt

    def _outgoing(
        self, request: web.BaseRequest, ctx: RequestContext, route: Route, url: str, body: RequestBody | None
    ) -> Outgoing:
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = Origin.parse(url)
        head, chunked = _request_head(request, ctx, route, origin, has_body=body is not None)
        return Outgoing(origin, head, self._timeouts_for(route), chunked, request.method == "HEAD")

    def _failed(
        self, ctx: RequestContext, route: Route, failure: UpstreamFailure, exc: BaseException
    ) -> GatewayError:
        ctx.upstream_error = failure.kind
        log.warning(
            "upstream_failed",
            request_id=ctx.request_id,
            route=route.name,
            kind=failure.kind,
            error=type(exc).__name__,
            upstream_target=ctx.upstream_target,
        )
        return GatewayError(failure.error)

    def _timeouts_for(self, route: Route) -> Timeouts:
        timeouts = self._timeouts.get(route.name)
        if timeouts is None:
            timeouts = self._timeouts[route.name] = Timeouts(
                connect=route.connect_timeout,
                response_headers=route.response_headers_timeout,
                idle_read=route.idle_read_timeout,
            )
        return timeouts

    async def _stream_response(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        route: Route,
        upstream: UpstreamResponse,
        body: RequestBody | None,
    ) -> web.StreamResponse:
        complete = upstream.complete
        response = (_ProxiedResponse if complete else web.StreamResponse)(
            status=upstream.status, reason=upstream.reason
        )
        headers = response.headers
        # The upstream's Content-Length stays as it is (httptools refused any that is not one valid length):
        # aiohttp frames the response by it, and chunks one that has none.
        headers.extend(end_to_end(upstream.headers))
        if ctx.cors:
            take_over_upstream_cors(headers, ctx.response_headers)
        headers.update(ctx.response_headers)
        await response.prepare(request)
        if complete:  # all of it is here: head and body in one send
            chunk = await upstream.read()
            ctx.bytes_out += len(chunk)
            await response.write_eof(chunk)
            return response
        while True:
            try:
                chunk = await upstream.read()
            except UpstreamError as exc:
                # The status line is already out: the only honest signal left is to cut the connection, so
                # the client sees an incomplete body instead of a complete-looking one.
                self._cut_mid_body(ctx, route, exc, body)
                upstream.close()
                if request.transport is not None:
                    request.transport.close()
                return response
            if not chunk:
                break
            try:
                await response.write(chunk)
            except ConnectionResetError:
                upstream.close()  # the client left: no reason to keep reading, and not the upstream's fault
                raise
            ctx.bytes_out += len(chunk)
        await response.write_eof()
        return response

    def _cut_mid_body(
        self, ctx: RequestContext, route: Route, exc: UpstreamError, body: RequestBody | None
    ) -> None:
        """Record why a response is being cut off: the client's upload stalled or outgrew the limit (which
        aborts the upstream request), or the upstream failed."""
        if body is not None and body.refusal is not None:
            ctx.error_reason = body.refusal.reason
            log.warning(
                "request_body_refused_mid_response",
                request_id=ctx.request_id,
                route=route.name,
                reason=body.refusal.reason,
            )
            return
        failure = classify(exc)
        ctx.upstream_error = failure.kind
        log.warning(
            "upstream_failed_mid_body",
            request_id=ctx.request_id,
            route=route.name,
            kind=failure.kind,
            upstream_target=ctx.upstream_target,
        )

    async def _error_response(self, ctx: RequestContext, upstream: UpstreamResponse) -> web.Response:
        body = await self._read_bounded(upstream)
        return upstream_error_response(
            ctx, upstream.status, upstream.headers, body, fmt=self._fmt, max_body=self._max_error_body
        )

    async def _read_bounded(self, upstream: UpstreamResponse) -> bytes | None:
        """At most max_error_body_bytes of the body; None (and the connection dropped) when there is more."""
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await upstream.read():
                size += len(chunk)
                if size > self._max_error_body:
                    upstream.close()
                    return None
                chunks.append(chunk)
        except UpstreamError:
            upstream.close()
            return None
        return b"".join(chunks)


def _request_head(
    request: web.BaseRequest, ctx: RequestContext, route: Route, origin: Origin, *, has_body: bool
) -> tuple[bytes, bool]:
    """The request line and headers as the upstream gets them, and whether the body goes chunked: a client's
    Content-Length is kept, a chunked upload (Transfer-Encoding is hop-by-hop) is chunked again."""
    headers, host = upstream_headers(request, ctx)
    if not (route.preserve_host and host):
        host = origin.host_header
    chunked = has_body and not any(name.lower() == "content-length" for name, _ in headers)
    # The target byte-exact (never re-quoted); header text is what aiohttp decoded, surrogates and all.
    lines = [f"{request.method} {origin.base_path}{ctx.target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape"), chunked
