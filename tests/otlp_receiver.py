"""A real OTLP/HTTP trace receiver on loopback: what the gateway exports, decoded with the OpenTelemetry proto
package, as a collector would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    """"" for a root span."""
    name: str
    kind: str
    """SERVER, CLIENT or INTERNAL."""
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    error: bool
    resource: dict[str, Any]
    start_ns: int
    end_ns: int


@dataclass
class OtlpReceiver:
    """`async with OtlpReceiver() as otlp:` — POST {otlp.endpoint} takes ExportTraceServiceRequest protobufs.
    `answer` is the status exports get (set it to 503 to refuse them); `requests` counts exports received."""

    answer: int = 200
    hang: bool = False
    """Take exports and never answer them (a collector that stalls)."""
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    port: int = 0
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    """Each export's headers, names in lower case."""
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, shutdown_timeout=0.25)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if self.hang:
            await asyncio.Event().wait()  # until the receiver's cleanup cancels it
        self.headers_seen.append({name.lower(): value for name, value in request.headers.items()})
        if self.answer != 200:
            return web.Response(status=self.answer)
        assert request.headers.get("Content-Type") == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        async with self._arrived:
            for resource_spans in message.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(_span(s, resource) for s in scope_spans.spans)
            self._arrived.notify_all()
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def wait_for(self, ready: Callable[[list[Span]], bool], within: float = 30.0) -> list[Span]:
        """The spans received so far, once `ready(spans)` holds (the gateway exports every schedule_delay)."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: ready(self.spans))
            return list(self.spans)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def _span(proto: SpanProto, resource: dict[str, Any]) -> Span:
    return Span(
        trace_id=proto.trace_id.hex(),
        span_id=proto.span_id.hex(),
        parent_id=proto.parent_span_id.hex(),
        name=proto.name,
        kind=SpanProto.SpanKind.Name(proto.kind).removeprefix("SPAN_KIND_"),
        attributes=_attributes(proto.attributes),
        events=[(e.name, _attributes(e.attributes)) for e in proto.events],
        error=proto.status.code == 2,  # STATUS_CODE_ERROR
        resource=resource,
        start_ns=proto.start_time_unix_nano,
        end_ns=proto.end_time_unix_nano,
    )


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None
