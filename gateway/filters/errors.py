"""Turns every failure below it into the canonical envelope; an unexpected exception becomes a 500 INTERNAL
whose body says nothing about the cause (the log has the traceback, under the request_id)."""

from __future__ import annotations

import structlog
from aiohttp import web

from gateway.context import RequestContext
from gateway.envelope import ErrorFormat, ErrorInfo, gateway_error, render
from gateway.http_conformance import expects_continue
from gateway.pipeline import Next

log = structlog.get_logger("gateway.errors")


class GatewayError(Exception):
    """Raised anywhere in the chain to answer the client with this error."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.reason)
        self.error = error


def error_response(error: ErrorInfo, ctx: RequestContext, fmt: ErrorFormat) -> web.Response:
    response = web.Response(
        status=error.http_status, body=render(error, ctx.request_id, fmt), content_type="application/json"
    )
    response.headers.extend(error.headers)
    response.headers.update(ctx.response_headers)
    if error.headers.get("Connection") == "close":
        response.force_close()
    ctx.error_reason = error.reason
    return response


class ErrorFilter:
    def __init__(self, fmt: ErrorFormat) -> None:
        self._fmt = fmt

    async def __call__(
        self, request: web.BaseRequest, ctx: RequestContext, call_next: Next
    ) -> web.StreamResponse:
        try:
            return await call_next(request, ctx)
        except GatewayError as exc:
            response = error_response(exc.error, ctx, self._fmt)
            if expects_continue(request) and not request.content.is_eof():
                # The client holds its body back until a 100 Continue that will not come now; the body's
                # bytes, if it sends them anyway, must not be read as a next request.
                response.force_close()
            return response
        except ConnectionResetError:
            raise  # the client went away; aiohttp closes the connection quietly
        except Exception:
            log.exception(
                "unhandled_error", request_id=ctx.request_id, route=ctx.route.name if ctx.route else None
            )
            return error_response(gateway_error(500, "INTERNAL"), ctx, self._fmt)
