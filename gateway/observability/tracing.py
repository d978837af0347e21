"""Spans of sampled requests, built with the OpenTelemetry SDK and exported in batches over OTLP/HTTP.

Only a request whose trace is sampled (trace_context.HeadSampler) reaches the SDK: starting even an
unsampled span through it cost ~9 µs per request here, against one ContextVar lookup for the helpers below
when no span is being recorded. The SDK's own sampler is therefore ALWAYS_ON: the decision is made before.

Exporting never holds up a request: spans wait in a bounded queue that the SDK's worker thread sends from;
when the queue is full (the collector is slow or down) a span is dropped and counted, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from contextvars import Token
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from gateway import __version__
from gateway.observability.metrics import SPANS_DROPPED, SPANS_EXPORTED
from gateway.observability.spans import ACTIVE, Active

if TYPE_CHECKING:
    from gateway.config import TracingConfig
    from gateway.observability.trace_context import Trace

# The stop waits this long at most for the last spans to reach the collector.
FLUSH_AT_STOP = 3.0


class _CountingExporter(SpanExporter):
    """Counts what the collector took and what it did not; `taken` is how many spans left the queue, read by
    _BoundedProcessor from the event loop's thread (each counter has one writer, so no lock is needed)."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter
        self._shut_down = threading.Lock()
        self.taken = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        try:
            result = self._exporter.export(spans)
        except Exception:  # a bug in an exporter must not end the worker thread
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            SPANS_EXPORTED.inc(len(spans))
        else:
            SPANS_DROPPED.labels("export_failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        """Once, from whichever comes first: the processor's shutdown or Tracer.close giving up on it."""
        if self._shut_down.acquire(blocking=False):
            self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor, with its queue bound kept here so that a span it would have to drop is
    counted: the SDK drops silently but for a log line, and reports drops only through OpenTelemetry
    metrics, which this gateway does not run."""

    def __init__(self, exporter: _CountingExporter, config: TracingConfig) -> None:
        self._exporter = exporter
        self._capacity = config.max_queue_size
        self._ended = 0
        self._batch = BatchSpanProcessor(
            exporter,
            max_queue_size=config.max_queue_size,
            schedule_delay_millis=config.schedule_delay * 1000,
            max_export_batch_size=min(config.max_export_batch_size, config.max_queue_size),
        )

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._ended - self._exporter.taken >= self._capacity:
            SPANS_DROPPED.labels("queue_full").inc()
            return
        self._ended += 1
        self._batch.on_end(span)

    def shutdown(self) -> None:
        self._batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


class _GivenTraceIds(RandomIdGenerator):
    """A new trace keeps the id the head sampler decided on (HeadSampler reads its low 64 bits, as
    TraceIdRatioBased does), so that downstream services sampling by ratio agree with the decision. Set just
    before the SDK starts the span, in the same thread: the SDK asks for a trace id only there."""

    def __init__(self) -> None:
        self.next_trace_id = 0

    def generate_trace_id(self) -> int:
        trace_id, self.next_trace_id = self.next_trace_id, 0
        return trace_id or super().generate_trace_id()


class _HashedOnce(Resource):
    """The SDK's Resource, hashed once. The OTLP encoder groups every span it sends by resource, and
    Resource.__hash__ serializes the attributes to sorted JSON each time: 3.7 µs a span here, about 4% of
    what a sampled request costs. The attributes cannot change after creation, so neither can the hash."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


class Tracer:
    """Everything tracing needs for one config: the SDK's provider, its queue and the OTLP exporter."""

    def __init__(self, config: TracingConfig) -> None:
        resource = _HashedOnce(
            Resource.create(
                {
                    "service.name": config.service_name,
                    "service.version": __version__,
                    # One per process: with --workers every worker exports under its own instance id.
                    "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
                    "process.pid": os.getpid(),
                }
            )
        )
        # A retry is logged as a warning each time, per worker, for as long as a collector is down; the
        # given-up batch is still an error, and gateway_tracing_spans_dropped_total counts every span lost.
        logging.getLogger(OTLPSpanExporter.__module__).setLevel(logging.ERROR)
        exporter = _CountingExporter(
            OTLPSpanExporter(
                endpoint=config.endpoint,
                headers={name: value.get_secret_value() for name, value in config.headers.items()},
                timeout=config.export_timeout,
            )
        )
        self._exporter = exporter
        self._processor = _BoundedProcessor(exporter, config)
        # shutdown_on_exit=False: the SDK's atexit hook would wait up to 30 s for an unreachable collector;
        # close() bounds the wait instead.
        self._ids = _GivenTraceIds()
        self._provider = TracerProvider(
            resource=resource, sampler=ALWAYS_ON, shutdown_on_exit=False, id_generator=self._ids
        )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("voipbin-gateway", __version__)

    def start_server_span(
        self, trace: Trace, name: str, attributes: Mapping[str, Any]
    ) -> tuple[Span, Token[Active | None]] | None:
        """The request's span, continuing the caller's trace or starting one, made current for the helpers
        below; `trace` then names it. End it with end_server_span. None when the SDK records nothing
        (OTEL_SDK_DISABLED): the request then goes on as an unsampled one would."""
        if trace.parent_id is not None:
            state = (
                TraceState([tuple(m.split("=", 1)) for m in trace.state.split(",")]) if trace.state else None
            )
            parent = SpanContext(
                int(trace.trace_id, 16),
                int(trace.parent_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                trace_state=state,
            )
            context = set_span_in_context(NonRecordingSpan(parent))
        else:
            context = Context()  # a root, whatever OpenTelemetry's current context holds
            self._ids.next_trace_id = int(trace.trace_id, 16)
        span = self._tracer.start_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)
        span_context = span.get_span_context()
        if not span.is_recording() or f"{span_context.trace_id:032x}" != trace.trace_id:
            self._ids.next_trace_id = 0
            return None
        trace.span_id = f"{span_context.span_id:016x}"
        trace.recorded = True
        return span, ACTIVE.set(Active(self._tracer, span))

    @staticmethod
    def end_server_span(span: Span, token: Token[Active | None]) -> None:
        ACTIVE.reset(token)
        span.end()

    async def close(self) -> None:
        """Send what is queued, waiting FLUSH_AT_STOP seconds at most. The SDK's shutdown blocks for up to
        30 s when the collector does not answer, so it runs in a daemon thread of its own (an executor's
        thread would hold up the process's exit), and is left to finish alone past the wait."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def shut_down() -> None:
            try:
                self._processor.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    loop.call_soon_threadsafe(_settle, finished)

        threading.Thread(target=shut_down, name="tracing-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(finished), FLUSH_AT_STOP)
        # Past the wait: no more retries (an export under way still runs to its timeout).
        self._exporter.shutdown()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
