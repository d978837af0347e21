"""W3C trace context and head sampling as pure functions (gateway/observability/trace_context.py)."""

from __future__ import annotations

import random

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from gateway.observability.trace_context import (
    HeadSampler,
    Propagation,
    Trace,
    continue_or_start,
    parse_traceparent,
    valid_tracestate,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def never(trace_id: str) -> bool:
    return False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
        (f"00-{TRACE}-{PARENT}-03", (TRACE, PARENT, True)),  # other flags: only the sampled bit counts
        (f"01-{TRACE}-{PARENT}-01-more", (TRACE, PARENT, True)),  # a later version, read by 00's rules
        (f"01-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
        (f"01-{TRACE}-{PARENT}-01more", None),  # a later version goes on with a dash
        (f"00-{TRACE}-{PARENT}-01-", None),  # version 00 is exactly 55 characters
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),
        (f"00-{TRACE}-{PARENT}-0g", None),
        (f"00-{TRACE[:-1]}-{PARENT}-01", None),
        (f" 00-{TRACE}-{PARENT}-01", None),
        ("", None),
    ],
)
def test_traceparent_is_read_as_the_spec_says(value: str, expected: tuple[str, str, bool] | None) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["congo=t61rcWkgMzE"], "congo=t61rcWkgMzE"),
        (["congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"], "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        (["congo=1", "rojo=2"], "congo=1,rojo=2"),  # several header lines are one list
        (["congo=1,,\t,rojo=2"], "congo=1,rojo=2"),  # empty members are allowed, and dropped
        (["tenant@vendor=x"], "tenant@vendor=x"),
        (["Congo=1"], None),  # keys are lower case
        (["congo=1,congo=2"], None),  # a key at most once
        (["congo"], None),
        (["congo=a,b"], None),  # "b" is not a member
        (["congo=ends with space "], "congo=ends with space"),  # spaces around a member are OWS
        (["congo=a=b"], None),  # no "=" in a value
        (["congo=caf\u00e9"], None),  # printable ASCII only
        ([",".join(f"k{i}=v" for i in range(33))], None),  # 32 members at most
        (["k=" + "v" * 256], "k=" + "v" * 256),
        (["k=" + "v" * 257], None),
        ([",".join(f"k{i}=" + "v" * 100 for i in range(6))], None),  # over 512 characters
        (["congo=1" + "," * 5000], None),  # never split: more input than a valid header can be made of
        (["congo=1" + " " * 4000], "congo=1"),
    ],
)
def test_tracestate_is_passed_on_whole_or_not_at_all(lines: list[str], expected: str | None) -> None:
    assert valid_tracestate(lines) == expected


def test_a_caller_trace_is_continued_under_a_span_of_the_gateway() -> None:
    trace = continue_or_start([f"00-{TRACE}-{PARENT}-01"], ["congo=1"], HeadSampler(0.0))
    assert (trace.trace_id, trace.parent_id, trace.sampled, trace.state) == (TRACE, PARENT, True, "congo=1")
    assert len(trace.span_id) == 16 and trace.span_id != PARENT
    assert trace.traceparent() == f"00-{TRACE}-{trace.span_id}-01"
    assert trace.traceparent("1234567890abcdef") == f"00-{TRACE}-1234567890abcdef-01"


@pytest.mark.parametrize(
    ("traceparent", "trust"),
    [
        ([f"00-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}-01"], True),  # two headers: invalid
        (["junk"], True),
        ([f"00-{TRACE}-{PARENT}-01"], False),
    ],
)
def test_otherwise_a_trace_is_started_and_the_tracestate_dropped(traceparent: list[str], trust: bool) -> None:
    trace = continue_or_start(traceparent, ["congo=1"], HeadSampler(1.0), trust_inbound=trust)
    assert trace.trace_id != TRACE and len(trace.trace_id) == 32
    assert (trace.parent_id, trace.state, trace.sampled) == (None, None, True)


def test_an_unsampled_caller_stays_unsampled_whatever_the_ratio() -> None:
    trace = continue_or_start([f"00-{TRACE}-{PARENT}-00"], [], HeadSampler(1.0))
    assert trace.sampled is False


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.25, 0.5, 1.0])
def test_the_head_sampler_decides_as_the_sdk_parent_based_ratio_sampler(ratio: float) -> None:
    """Every service using OpenTelemetry's ParentBased(TraceIdRatioBased) agrees with the gateway."""
    sdk = ParentBased(TraceIdRatioBased(ratio))
    ours = HeadSampler(ratio)
    rng = random.Random(ratio)
    for _ in range(2000):
        trace_id = rng.getrandbits(128) or 1
        expected = sdk.should_sample(Context(), trace_id, "x").decision is Decision.RECORD_AND_SAMPLE
        assert ours(f"{trace_id:032x}") is expected
    assert ours("0" * 16 + "f" * 16) is (ratio == 1.0)
    parent = set_span_in_context(NonRecordingSpan(SpanContext(1, 2, True, TraceFlags(1))))
    assert sdk.should_sample(parent, 1, "x").decision is Decision.RECORD_AND_SAMPLE  # what the gateway keeps


def test_new_ids_are_random_lowercase_hex() -> None:
    traces = {continue_or_start([], [], never).trace_id for _ in range(100)}
    assert len(traces) == 100
    assert all(len(t) == 32 and t == t.lower() and int(t, 16) for t in traces)


def propagate(*headers: tuple[str, str], trust: bool = True) -> tuple[Trace, dict[str, str | None]]:
    overrides: dict[str, str | None] = {"Authorization": None}  # set by others before: kept
    propagation = Propagation(HeadSampler(1.0), trust_inbound=trust)
    return propagation(CIMultiDictProxy(CIMultiDict(headers)), overrides), overrides


def test_the_upstream_is_told_the_gateways_span_and_the_callers_state() -> None:
    trace, overrides = propagate(("TraceParent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "congo=1"))
    assert overrides == {
        "Authorization": None,
        "traceparent": f"00-{TRACE}-{trace.span_id}-01",
        "tracestate": "congo=1",
    }
    assert trace.parent_id == PARENT and trace.span_id != PARENT


def test_a_request_without_trace_context_starts_one_for_the_upstream() -> None:
    trace, overrides = propagate(("Accept", "*/*"))
    assert overrides == {"Authorization": None, "traceparent": trace.traceparent()}
    assert trace.parent_id is None and trace.sampled


@pytest.mark.parametrize(
    ("headers", "trust"),
    [
        ((("tracestate", "congo=1"),), True),  # a state without its parent
        ((("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "congo=1")), False),  # not trusted
        ((("traceparent", "garbage"), ("tracestate", "congo=1")), True),
    ],
)
def test_a_tracestate_never_reaches_the_upstream_without_its_parent(
    headers: tuple[tuple[str, str], ...], trust: bool
) -> None:
    trace, overrides = propagate(*headers, trust=trust)
    assert trace.parent_id is None and trace.trace_id != TRACE
    assert overrides["tracestate"] is None  # removed from what the client sent
    assert overrides["traceparent"] == trace.traceparent()
