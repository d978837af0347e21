"""aiohttp's connection pools to the upstream (WebSocket streams and introspection; API requests go through
proxy/client.py), the request headers the upstream receives, how its failures are named, and when a failed
request may go out again."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from opentelemetry.trace import Span

from gateway.config import UpstreamConfig
from gateway.context import RequestContext
from gateway.envelope import ErrorInfo, gateway_error
from gateway.forwarding import forward_headers
from gateway.observability import spans
from gateway.observability.trace_context import TRACEPARENT
from gateway.proxy.client import LOCAL_ERRNOS, ConnectTimeout, PoolWaitTimeout, UpstreamError
from gateway.proxy.ws_relay import UpstreamSide

_Response = TypeVar("_Response")

# Headers aiohttp would otherwise invent; the upstream sees only what the client sent.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


# Set in the task that sends a request when aiohttp hands it a pooled connection (see _PoolConnector).
_REUSED: ContextVar[bool] = ContextVar("gateway_upstream_reused", default=False)
# How far a WebSocket handshake's connection got (see _PoolConnector, connection_stage).
_STAGE: ContextVar[Literal["waiting", "connecting", "connected"]] = ContextVar(
    "gateway_upstream_stage", default="waiting"
)


class _PoolConnector(aiohttp.TCPConnector):
    """Notes when a request is given a pooled connection, which Resends needs to tell a stale connection
    from a failing upstream. aiohttp's public hook for this, TraceConfig.on_connection_reuseconn, switches on
    tracing for every request, which benchmarks/ measured at ~75 µs of CPU per request (a quarter of the
    gateway's whole cost); this overrides the private pool lookup instead. The stale-connection tests in
    tests/test_proxy.py fail if an aiohttp upgrade changes it. The flag is a ContextVar: the lookup runs in
    the task that awaits session.request(), so that task reads it back."""

    async def _get(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super()._get(*args, **kwargs)
        if connection is not None:
            _REUSED.set(True)
        return connection

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        # Called once the connector has a free slot (max_websockets): the wait for one is the gateway's.
        _STAGE.set("connecting")
        connection = await super()._create_connection(*args, **kwargs)
        _STAGE.set("connected")
        return connection


async def within(seconds: float, call: Awaitable[_Response]) -> _Response:
    """Await an aiohttp call made through a _PoolConnector for at most `seconds`. A timeout says how far
    its connection got: still waiting for a free slot of the gateway's own pool (PoolWaitTimeout, no
    target's fault), connecting (ConnectTimeout: nothing was sent), or waiting for the answer."""
    _STAGE.set("waiting")
    try:
        async with asyncio.timeout(seconds):
            return await call
    except TimeoutError:
        stage = _STAGE.get()
        if stage == "waiting":
            raise PoolWaitTimeout("no pooled connection became free in time") from None
        if stage == "connecting":
            raise ConnectTimeout("connecting to the upstream took too long") from None
        raise


def _connector(
    config: UpstreamConfig, ssl_context: ssl.SSLContext, *, limit: int, limit_per_host: int = 0
) -> aiohttp.TCPConnector:
    return _PoolConnector(
        limit=limit,
        limit_per_host=limit_per_host,
        keepalive_timeout=config.pool.keepalive_timeout,
        ttl_dns_cache=30,
        ssl=ssl_context,
    )


def _session(connector: aiohttp.TCPConnector, **kwargs: Any) -> aiohttp.ClientSession:
    session = aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # one jar shared by every client would leak sessions
        auto_decompress=False,
        skip_auto_headers=_NO_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
        requote_redirect_url=False,
        read_bufsize=2**16,
        max_line_size=16384,
        max_field_size=16384,
        **kwargs,
    )
    # aiohttp re-sends an idempotent request once by itself after a dropped connection, new or pooled; the
    # gateway decides instead (see Resends), so that `upstream.retries` means what it says. No public
    # switch exists.
    session._retry_connection = False
    return session


def make_session(config: UpstreamConfig, ssl_context: ssl.SSLContext) -> aiohttp.ClientSession:
    """The keep-alive pool for introspection calls to the upstream; `ssl_context` is gateway/tls.py's
    upstream_context."""
    return _session(
        _connector(
            config,
            ssl_context,
            limit=config.pool.max_connections,
            limit_per_host=config.pool.max_connections_per_host,
        )
    )


class UpgradeRefused(Exception):
    """The upstream answered a WebSocket upgrade with something other than 101. Its response is still open:
    whoever catches this reads what it needs of the body, then releases it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass(frozen=True, slots=True)
class UpgradeAnswer:
    """The upstream's 101: its headers, and the connection the stream goes on over."""

    headers: CIMultiDictProxy[str]
    transport: asyncio.BaseTransport | None


# Set in the task that made the handshake (see _upgrade_answer).
_UPGRADE_ANSWER: ContextVar[UpgradeAnswer | None] = ContextVar("gateway_upgrade_answer", default=None)
_Handler = Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]]


async def _upgrade_answer(request: aiohttp.ClientRequest, handler: _Handler) -> aiohttp.ClientResponse:
    """ws_connect keeps a 101's headers and connection to itself and drops the body of a refusal; the
    gateway needs all three (client middlewares run inside ws_connect, in the calling task)."""
    response = await handler(request)
    if response.status != 101:
        raise UpgradeRefused(response)
    connection = response.connection
    _UPGRADE_ANSWER.set(UpgradeAnswer(response.headers, connection.transport if connection else None))
    return response


def upgrade_answer() -> UpgradeAnswer | None:
    """The 101 of the last handshake this task made through a WebSocketPool."""
    return _UPGRADE_ANSWER.get()


class WebSocketPool:
    """The upstream connections of WebSocket streams, a pool apart from API requests': an event stream holds
    one for hours, and in the HTTP pool enough open streams would leave API requests waiting. A stream takes
    a slot for its whole life; with every slot taken the next upgrade is refused at once (take() is False)
    instead of queueing in the connector until it times out."""

    def __init__(self, config: UpstreamConfig, ssl_context: ssl.SSLContext) -> None:
        self.limit = config.pool.max_websockets
        self.open = 0
        self.session = _session(
            _connector(config, ssl_context, limit=self.limit),
            middlewares=(_upgrade_answer,),
            ws_response_class=UpstreamSide,
        )

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1

    async def close(self) -> None:
        await self.session.close()


def upstream_headers(
    request: web.BaseRequest, ctx: RequestContext
) -> tuple[list[tuple[str, str]], str | None]:
    """The request headers for the upstream (see forward_headers), and the client's Host."""
    return forward_headers(
        request.headers,
        peer=request.remote,
        peer_trusted=ctx.peer_trusted,
        scheme=request.scheme,
        request_id=ctx.request_id,
        overrides=ctx.upstream_header_overrides,
    )


def parent_of_upstream(ctx: RequestContext, span: Span) -> None:
    """The upstream is told that `span`, the gateway's call to it, is its parent."""
    assert ctx.trace is not None
    span_id = f"{span.get_span_context().span_id:016x}"
    ctx.upstream_header_overrides[TRACEPARENT] = ctx.trace.traceparent(span_id)


def describe_upstream_call(span: Span, ctx: RequestContext) -> None:
    target = ctx.upstream_target
    if target is not None:  # a URL from the config, which keeps credentials out of it
        span.set_attribute("gateway.upstream.target", target)
        where = spans.endpoint(target)
        # The path as sent: the target's base path, then the request's, never its query (keys travel there).
        where["url.path"] = where["url.path"].rstrip("/") + ctx.target.partition("?")[0]
        span.set_attributes(where)
    if ctx.upstream_error is not None:
        spans.failed(span, ctx.upstream_error)


class UpstreamFailure(Exception):
    """The upstream could not give an answer; `kind` is connect, timeout, reset or protocol. `unsent`: the
    request never reached it; `local`: the gateway's own limits failed it (see UpstreamError)."""

    def __init__(self, kind: str, error: ErrorInfo, *, unsent: bool = False, local: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error
        self.unsent = unsent
        self.local = local


def classify(exc: BaseException) -> UpstreamFailure:
    """Name a client-side exception the way operators think of it, and the envelope the client gets."""
    if isinstance(exc, UpstreamError):
        status, reason = (504, "REQUEST_TIMEOUT") if exc.kind == "timeout" else (502, "UPSTREAM_UNAVAILABLE")
        return UpstreamFailure(exc.kind, gateway_error(status, reason), unsent=exc.unsent, local=exc.local)
    if isinstance(exc, asyncio.TimeoutError):  # includes aiohttp's connect and socket-read timeouts
        return UpstreamFailure("timeout", gateway_error(504, "REQUEST_TIMEOUT"))
    if isinstance(exc, aiohttp.ClientConnectorError):
        if exc.errno in LOCAL_ERRNOS:
            return UpstreamFailure("connect", gateway_error(502, "UPSTREAM_UNAVAILABLE"), local=True)
        kind = "connect"
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        kind = "reset"
    else:
        kind = "protocol"
    return UpstreamFailure(kind, gateway_error(502, "UPSTREAM_UNAVAILABLE"))


async def send(
    attempt: Callable[[], Awaitable[_Response]],
    *,
    retries: int,
    idempotent: bool,
    replayable: Callable[[], bool] = lambda: True,
    on_resend: Callable[[UpstreamFailure, str], None] | None = None,
    failover: bool = False,
) -> _Response:
    """One request (`attempt` sends it once, on either client), sent again while Resends allows: every
    request to the upstream gets the same stale-connection handling, since aiohttp's own is switched off.
    `failover`: each attempt goes to a target of a pool. Raises the last try's error."""
    resends: Resends | None = None  # only a failure needs one
    while True:
        _REUSED.set(False)
        try:
            return await attempt()
        except (aiohttp.ClientError, TimeoutError, UpstreamError) as exc:
            failure = classify(exc)
            if resends is None:
                resends = Resends(retries, idempotent=idempotent, failover=failover)
            reused = exc.reused if isinstance(exc, UpstreamError) else _REUSED.get()
            why = resends.allow(failure, reused=reused, replayable=replayable())
            if why is None:
                raise
            if on_resend is not None:
                on_resend(failure, why)


class Resends:
    """Whether a request whose upstream connection failed before any response byte may go out again.

    Only an idempotent request qualifies, and only while its body can be sent again byte for byte (none,
    or still held in full): RFC 9110 §9.2.2 forbids a proxy to retry a non-idempotent request, which the
    upstream may have received and applied before the connection dropped.

    A pooled keep-alive connection that fails this way was closed by the upstream as the request arrived
    (aiohttp never hands out one it already knows is closed). That is the pool's doing, not an upstream
    failure, so the first such request is re-sent even with `upstream.retries: 0` and without using up a
    retry (RFC 9112 §9.3.1). Other failures before any response byte (refused, reset, dropped on a new
    connection) are retried at most `retries` times; with `failover` (a pool, whose next attempt goes to
    another target while one is usable) so is a timeout that struck before anything was sent (a target that
    drops connection attempts); a wait for the gateway's own full connection pool is not (a retry would wait
    for the same pool).
    """

    __slots__ = ("_failover", "_retries_left", "_stale_left")

    def __init__(self, retries: int, *, idempotent: bool, failover: bool = False) -> None:
        self._retries_left = retries if idempotent else 0
        self._stale_left = idempotent
        self._failover = failover

    def allow(
        self, failure: UpstreamFailure, *, reused: bool, replayable: bool
    ) -> Literal["stale", "retry"] | None:
        """Why the request may go out again ("stale" connection, or a "retry"), or None when it may not."""
        resendable = failure.kind in ("connect", "reset") or (failure.unsent and self._failover)
        if not resendable or not replayable:
            return None
        if reused and self._stale_left:
            self._stale_left = False
            return "stale"
        if self._retries_left > 0:
            self._retries_left -= 1
            return "retry"
        return None
