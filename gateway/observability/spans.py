"""Child spans and events of the request span being recorded (tracing.py starts it), for the code that does
the work: authentication, Redis, the upstream call. With no span being recorded (tracing off, or the
request not sampled) each helper costs one ContextVar lookup and does nothing."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from types import TracebackType
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from yarl import URL


class Active:
    __slots__ = ("context", "span", "tracer")

    def __init__(self, tracer: Any, span: Span) -> None:
        self.tracer = tracer
        self.span = span
        self.context: Context = set_span_in_context(span)


# The span being recorded in this task (None for an unsampled request, or with tracing off). A ContextVar:
# tasks a request starts (the WebSocket relay, a JWKS fetch) see the span that was current when they began.
ACTIVE: ContextVar[Active | None] = ContextVar("gateway_trace_span", default=None)
_NOT_RECORDING: nullcontext[None] = nullcontext()


class _ChildSpan:
    __slots__ = ("_active", "_attributes", "_kind", "_name", "_span", "_token")

    def __init__(
        self, active: Active, name: str, kind: SpanKind, attributes: Mapping[str, Any] | None
    ) -> None:
        self._active = active
        self._name = name
        self._kind = kind
        self._attributes = attributes

    def __enter__(self) -> Span:
        active = self._active
        span = self._span = active.tracer.start_span(
            self._name, context=active.context, kind=self._kind, attributes=self._attributes
        )
        self._token = ACTIVE.set(Active(active.tracer, span))
        return span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        ACTIVE.reset(self._token)
        if kind is not None and self._span.status.status_code is not StatusCode.ERROR:  # not told why yet
            failed(self._span, kind.__name__)
        self._span.end()


def span(
    name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Span | None]:
    """A child of the span being recorded, current inside the `with`; None (and nothing done) when no span
    is being recorded, which is one ContextVar lookup."""
    active = ACTIVE.get()
    if active is None:
        return _NOT_RECORDING
    return _ChildSpan(active, name, kind, attributes)


def event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """An event on the span being recorded, if any."""
    active = ACTIVE.get()
    if active is not None:
        active.span.add_event(name, attributes)


def answered(status: int) -> None:
    """The span being recorded (an upstream call) got its response head now."""
    active = ACTIVE.get()
    if active is not None:
        active.span.add_event("response_headers")
        active.span.set_attribute("http.response.status_code", status)


def record(
    name: str, seconds: float, kind: SpanKind, attributes: Mapping[str, Any], *, error: str | None = None
) -> None:
    """A child span that ended just now after `seconds`, for work timed elsewhere (a Redis round trip)."""
    active = ACTIVE.get()
    if active is None:
        return
    end = time.time_ns()
    child = active.tracer.start_span(
        name, context=active.context, kind=kind, attributes=attributes, start_time=end - int(seconds * 1e9)
    )
    if error is not None:
        failed(child, error)
    child.end(end_time=end)


def endpoint(url: str) -> dict[str, Any]:
    """A called URL's attributes, without its query or user info, where credentials can travel."""
    parsed = URL(url)
    attributes: dict[str, Any] = {"url.path": parsed.raw_path}  # as sent, not decoded
    if parsed.host is not None:
        attributes["server.address"] = parsed.host
    if parsed.port is not None:
        attributes["server.port"] = parsed.port
    return attributes


def failed(target: Span, error_type: str) -> None:
    """Marked as failed by the kind of error only: exception messages can quote URLs and headers."""
    target.set_attribute("error.type", error_type)
    target.set_status(Status(StatusCode.ERROR))
