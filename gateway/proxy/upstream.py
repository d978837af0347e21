"""The connection pool to the upstream, the request headers it receives, and how its failures are named."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.config import UpstreamConfig
from gateway.context import RequestContext
from gateway.envelope import ErrorInfo, gateway_error
from gateway.forwarding import add_forwarded, drop_lookalikes, strip_hop_by_hop
from gateway.request_id import HEADER as REQUEST_ID_HEADER

# Headers aiohttp would otherwise invent; the upstream sees only what the client sent.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def make_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.pool.max_connections,
        limit_per_host=config.pool.max_connections_per_host,
        keepalive_timeout=config.pool.keepalive_timeout,
        ttl_dns_cache=30,
        ssl=None if config.tls_verify else False,
    )
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
    )
    # aiohttp re-sends an idempotent request once by itself when a connection drops; the gateway's own
    # `upstream.retries` decides instead, so that "at most N retries" stays true. No public switch exists.
    session._retry_connection = False
    return session


def upstream_headers(
    request: web.BaseRequest, ctx: RequestContext, *, preserve_host: bool
) -> CIMultiDict[str]:
    headers = strip_hop_by_hop(request.headers)
    host = headers.popall("Host", (None,))[0]
    if preserve_host and host:
        headers["Host"] = host
    headers.popall("Expect", None)  # answered by the gateway already
    headers[REQUEST_ID_HEADER] = ctx.request_id
    add_forwarded(
        headers, peer=request.remote, peer_trusted=ctx.peer_trusted, scheme=request.scheme, host=host
    )
    overrides = ctx.upstream_header_overrides
    drop_lookalikes(headers, {name.lower().replace("_", "-") for name in overrides})
    for name, value in overrides.items():
        if value is not None:
            headers[name] = value
    return headers


class UpstreamFailure(Exception):
    """The upstream could not give an answer; `kind` is connect, timeout, reset or protocol."""

    def __init__(self, kind: str, error: ErrorInfo) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error


def classify(exc: BaseException) -> UpstreamFailure:
    """Name a client-side exception the way operators think of it, and the envelope the client gets."""
    if isinstance(exc, asyncio.TimeoutError):  # includes aiohttp's connect and socket-read timeouts
        return UpstreamFailure("timeout", gateway_error(504, "REQUEST_TIMEOUT"))
    if isinstance(exc, aiohttp.ClientConnectorError):
        kind = "connect"
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        kind = "reset"
    else:
        kind = "protocol"
    return UpstreamFailure(kind, gateway_error(502, "UPSTREAM_UNAVAILABLE"))


def retryable(failure: UpstreamFailure) -> bool:
    """Only failures that happen before any response byte; the caller also checks the method and body."""
    return failure.kind in ("connect", "reset")
