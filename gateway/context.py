"""Per-request state that the filters pass along the chain."""

from __future__ import annotations

from dataclasses import dataclass, field

from multidict import CIMultiDict

from gateway.auth.identity import Identity
from gateway.observability.trace_context import Trace
from gateway.ratelimit.limiter import Outcome
from gateway.routing import Route


@dataclass(slots=True)
class StreamStats:
    """A WebSocket stream from its 101 on (proxy/ws_relay.py); its bytes are the request's bytes_in/out."""

    opened: float
    """time.perf_counter() when the client got its 101."""
    messages_in: int = 0
    """Messages relayed from the client to the upstream."""
    messages_out: int = 0
    """Messages relayed from the upstream to the client."""
    closed_by: str | None = None
    """client, upstream or gateway: who ended the stream."""
    close_code: int | None = None
    """The code that ended it: the closing side's (1006 when its connection was lost without one), or the
    gateway's own."""
    close_reason: str | None = None
    """Why the gateway ended it: message_too_big, protocol_error, send_timeout, shutdown or reload."""


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float
    """time.perf_counter() when the request reached the chain: loop.time() has only millisecond
    resolution under uvloop, too coarse for latency histograms."""
    client_ip: str | None
    peer_trusted: bool
    route: Route | None = None
    target: str = ""
    """Path and query for the upstream: the client's raw target, minus credentials when a route hides them."""
    identity: Identity | None = None
    upstream_header_overrides: dict[str, str | None] = field(default_factory=dict)
    """Set (or, with None, remove) these request headers on the way upstream, after everything else."""
    response_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    """Headers every response to this request carries (X-Request-ID, rate-limit headers), whoever answers."""
    cors: bool = False
    """The gateway answers this request's CORS (filters/cors.py): the upstream's Access-Control-* headers are
    dropped, and its Vary kept beside the gateway's."""
    error_reason: str | None = None
    rate_limit: Outcome | None = None
    auth: tuple[str, str] | None = None
    """(result, reason) of authentication: success/failure/unavailable/anonymous and the check's name."""
    credential_kind: str | None = None
    """jwt or accesskey: what the request presented, known before (and whether or not) it verified."""
    bytes_in: int = 0
    bytes_out: int = 0
    """Body bytes streamed to the client by the proxy (a plain Response's size is its length)."""
    upstream_seconds: float | None = None
    """From sending the request upstream to its response headers."""
    upstream_error: str | None = None
    """connect, timeout, reset or protocol when the upstream failed this request; ejected when every target
    of its pool was out."""
    upstream_target: str | None = None
    """The URL the request (its last attempt) was sent to."""
    stream: StreamStats | None = None
    """Set once a WebSocket upgrade succeeded."""
    trace: Trace | None = None
    """The request's W3C trace context (trace_context.Propagation, set before the chain); None with
    tracing.propagate off."""
