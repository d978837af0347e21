"""Why the request path reads and writes W3C trace context by hand (gateway/observability/trace_context.py)
instead of through OpenTelemetry's propagator and SDK: CPU µs per request for each way, in one process.

    .venv/bin/python -m benchmarks.trace_context [--rounds 200000]
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.observability.trace_context import HeadSampler, Propagation

# A caller that did not sample: the SDK then builds a non-recording span, as the gateway builds none.
INBOUND = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}
NO_HEADERS: dict[str, str] = {}


def by_hand(headers: dict[str, str]) -> Callable[[], object]:
    """What every request does before the filter chain: the trace, and the upstream's headers for it."""
    propagation = Propagation(HeadSampler(0.01), trust_inbound=True)
    request_headers = CIMultiDictProxy(CIMultiDict(headers))

    def run() -> object:
        overrides: dict[str, str | None] = {}
        return propagation(request_headers, overrides)

    return run


def by_propagator(headers: dict[str, str]) -> Callable[[], object]:
    """Extract the caller's context, start an unsampled span under it with the SDK (a new trace: sampled at
    1%), inject."""
    propagator = TraceContextTextMapPropagator()
    tracer = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01))).get_tracer("bench")

    def run() -> object:
        context = propagator.extract(headers)
        span = tracer.start_span("GET", context=context)
        out: dict[str, str] = {}
        propagator.inject(out, trace.set_span_in_context(span))
        span.end()
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200_000)
    rounds = parser.parse_args().rounds
    print(f"{'case':60} {'µs/request':>10}")
    for label, headers in (("no traceparent (a new trace)", NO_HEADERS), ("with a traceparent", INBOUND)):
        for way, build in (("by hand", by_hand), ("OpenTelemetry propagator + SDK", by_propagator)):
            run = build(headers)
            best = min(timeit.repeat(run, number=rounds, repeat=3)) / rounds * 1e6
            print(f"{label + ', ' + way:60} {best:10.2f}")


if __name__ == "__main__":
    main()
