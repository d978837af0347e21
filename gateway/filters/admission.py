"""Request hygiene before any routing: draining, overload, header limits."""

from __future__ import annotations

from aiohttp import web

from gateway.context import RequestContext
from gateway.envelope import gateway_error
from gateway.filters.errors import GatewayError
from gateway.pipeline import Next

DRAINING = gateway_error(
    503, "SERVICE_UNAVAILABLE", "The gateway is shutting down.", headers={"Connection": "close"}
)


class Admission:
    """Counts requests in flight and refuses new ones while draining or over capacity."""

    def __init__(self, *, max_in_flight: int, max_header_bytes: int, max_header_count: int) -> None:
        self._max_in_flight = max_in_flight or None
        self._max_header_bytes = max_header_bytes
        self._max_header_count = max_header_count
        self.in_flight = 0
        self.draining = False

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        if self.draining:
            raise GatewayError(DRAINING)
        if self._max_in_flight is not None and self.in_flight >= self._max_in_flight:
            raise GatewayError(
                gateway_error(503, "SERVICE_UNAVAILABLE", "The gateway is overloaded; retry shortly.")
            )
        self._check_headers(request)
        self.in_flight += 1
        try:
            return await call_next(request, ctx)
        finally:
            self.in_flight -= 1

    def _check_headers(self, request: web.BaseRequest) -> None:
        raw = request.raw_headers
        # The HTTP parser already caps the count and each field; the total is ours to enforce.
        if (
            len(raw) > self._max_header_count
            or sum(len(k) + len(v) + 4 for k, v in raw) > self._max_header_bytes
        ):
            raise GatewayError(gateway_error(431, "HEADERS_TOO_LARGE"))
