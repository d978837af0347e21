"""Forward one HTTP request and stream the answer back; upstream errors come back as envelopes.

Bodies are never buffered: the request body flows from the client's stream into the upstream connection
and the response body the other way, with aiohttp's flow control pausing whichever side is faster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.context import RequestContext
from gateway.envelope import ErrorFormat, gateway_error
from gateway.filters.errors import GatewayError, error_response
from gateway.forwarding import strip_hop_by_hop
from gateway.health import UpstreamHealth
from gateway.proxy.upstream import UpstreamFailure, classify, retryable, upstream_headers
from gateway.routing import IDEMPOTENT_METHODS, Route
from gateway.upstream_errors import decode_body, normalize

log = structlog.get_logger("gateway.proxy")

# Replaced by the gateway on error responses it rewrites.
_ENTITY_HEADERS = ("Content-Length", "Content-Type", "Content-Encoding")


class BodyTooLarge(Exception):
    pass


class RequestBody:
    """The client's body as the upstream request's payload, counted against the route's limit."""

    __slots__ = ("_limit", "_stream", "sent", "too_large")

    def __init__(self, stream: aiohttp.StreamReader, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.sent = 0
        self.too_large = False

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream.iter_any():
            self.sent += len(chunk)
            if self.sent > self._limit:
                self.too_large = True
                raise BodyTooLarge
            yield chunk


class HttpProxy:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        health: UpstreamHealth,
        *,
        error_format: ErrorFormat,
        max_error_body_bytes: int,
    ) -> None:
        self._session = session
        self._health = health
        self._fmt = error_format
        self._max_error_body = max_error_body_bytes
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}

    async def __call__(self, request: web.BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        route = ctx.route
        assert route is not None
        loop = asyncio.get_running_loop()
        body = RequestBody(request.content, route.max_body_bytes) if request.body_exists else None
        sent_at = loop.time()
        try:
            upstream = await self._send(request, ctx, route, body)
            ctx.upstream_seconds = loop.time() - sent_at
            self._health.mark_reachable(route.upstream)
            try:
                if upstream.status >= 400:
                    return await self._error_response(ctx, upstream)
                return await self._stream_response(request, ctx, route, upstream)
            finally:
                upstream.release()
        finally:
            if body is not None:  # the upload may go on after the response headers
                ctx.bytes_in = body.sent

    async def _send(
        self, request: web.BaseRequest, ctx: RequestContext, route: Route, body: RequestBody | None
    ) -> aiohttp.ClientResponse:
        url = URL(route.upstream + ctx.target, encoded=True)  # byte-exact: never re-quoted
        headers = upstream_headers(request, ctx, preserve_host=route.preserve_host)
        retries_left = route.retries if request.method in IDEMPOTENT_METHODS else 0
        while True:
            try:
                return await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body.chunks() if body is not None else None,
                    allow_redirects=False,
                    timeout=self._timeout(route),
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                if body is not None and body.too_large:
                    raise GatewayError(
                        gateway_error(
                            413,
                            "REQUEST_TOO_LARGE",
                            f"The request body exceeds {route.max_body_bytes} bytes.",
                        )
                    ) from None
                failure = classify(exc)
                # A retry must not replay a body we no longer have, nor a request the upstream may have seen.
                if retries_left > 0 and retryable(failure) and (body is None or body.sent == 0):
                    retries_left -= 1
                    log.info("upstream_retry", request_id=ctx.request_id, route=route.name, kind=failure.kind)
                    continue
                raise self._failed(ctx, route, failure, exc) from None

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
        )
        return GatewayError(failure.error)

    def _timeout(self, route: Route) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(route.name)
        if timeout is None:
            # sock_read starts once the request is fully sent, so here it bounds time to the response headers;
            # it becomes the idle-read timeout when the body starts (see _stream_response).
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=route.connect_timeout,
                sock_connect=route.connect_timeout,
                sock_read=route.response_headers_timeout,
            )
            self._timeouts[route.name] = timeout
        return timeout

    async def _stream_response(
        self, request: web.BaseRequest, ctx: RequestContext, route: Route, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        headers = strip_hop_by_hop(upstream.headers)
        length = headers.popall("Content-Length", (None,))[0]
        if length is not None and length.isdigit():
            response.content_length = int(length)
        response.headers.extend(headers)
        response.headers.update(ctx.response_headers)
        connection = upstream.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = route.idle_read_timeout
            connection.protocol.start_timeout()
        await response.prepare(request)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The status line is already out: the only honest signal left is to cut the connection, so
                # the client sees an incomplete body instead of a complete-looking one.
                failure = classify(exc)
                ctx.upstream_error = failure.kind
                log.warning(
                    "upstream_failed_mid_body", request_id=ctx.request_id, route=route.name, kind=failure.kind
                )
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

    async def _error_response(self, ctx: RequestContext, upstream: aiohttp.ClientResponse) -> web.Response:
        body = await self._read_bounded(upstream)
        if body is not None:
            body = decode_body(body, upstream.headers.get("Content-Encoding", ""), self._max_error_body)
        error = normalize(upstream.status, upstream.headers.get("Content-Type", ""), body)
        headers = strip_hop_by_hop(upstream.headers)
        for name in _ENTITY_HEADERS:
            headers.popall(name, None)
        response = error_response(error, ctx, self._fmt)
        _prepend(response.headers, headers)
        return response

    async def _read_bounded(self, upstream: aiohttp.ClientResponse) -> bytes | None:
        """At most max_error_body_bytes of the body; None (and the connection dropped) when there is more."""
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in upstream.content.iter_any():
                size += len(chunk)
                if size > self._max_error_body:
                    upstream.close()
                    return None
                chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError):
            upstream.close()
            return None
        return b"".join(chunks)


def _prepend(target: CIMultiDict[str], upstream: CIMultiDict[str]) -> None:
    """Upstream headers (WWW-Authenticate, Retry-After, ...) kept on a rewritten error; ours win."""
    ours = {name.lower() for name in target}
    for name, value in upstream.items():
        if name.lower() not in ours:
            target.add(name, value)
