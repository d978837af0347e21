"""An upstream's error answer as the client gets it, from the HTTP proxy or a refused WebSocket upgrade: the
body normalized into the envelope, the upstream's informative headers (WWW-Authenticate, Retry-After, ...)
kept beside the gateway's own."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import RequestContext
from gateway.cors import take_over_upstream_cors
from gateway.envelope import ErrorFormat
from gateway.filters.errors import error_response
from gateway.forwarding import strip_hop_by_hop
from gateway.upstream_errors import decode_body, normalize

_ENTITY_HEADERS = ("Content-Length", "Content-Type", "Content-Encoding")


def upstream_error_response(
    ctx: RequestContext,
    status: int,
    headers: CIMultiDictProxy[str] | Sequence[tuple[str, str]],
    body: bytes | None,
    *,
    fmt: ErrorFormat,
    max_body: int,
) -> web.Response:
    """`body` is at most `max_body` bytes as the upstream sent them, or None when there was more."""
    kept = strip_hop_by_hop(headers)
    if body is not None:
        body = decode_body(body, kept.get("Content-Encoding", ""), max_body)
    error = normalize(status, kept.get("Content-Type", ""), body)
    for name in _ENTITY_HEADERS:
        kept.popall(name, None)
    if ctx.cors:
        take_over_upstream_cors(kept, ctx.response_headers)
    response = error_response(error, ctx, fmt)
    _prepend(response.headers, kept)
    return response


def _prepend(target: CIMultiDict[str], upstream: CIMultiDict[str]) -> None:
    """Upstream headers kept on a rewritten error; ours win."""
    ours = {name.lower() for name in target}
    for name, value in upstream.items():
        if name.lower() not in ours:
            target.add(name, value)
