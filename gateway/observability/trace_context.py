"""W3C Trace Context (https://www.w3.org/TR/trace-context/): an inbound `traceparent`/`tracestate` checked and
continued, or a trace started, and the head sampling decision (parent-based, else by ratio). Pure: no I/O
and no OpenTelemetry SDK, so that it runs on every request whether or not tracing exports anything.

Hand-written rather than OpenTelemetry's TraceContextTextMapPropagator with an unsampled SDK span: that
cost 7 µs per request without a traceparent and 12 µs with one, against 2 and 3 µs for Propagation below
(`python -m benchmarks.trace_context`, on a quiet 2-core box), and its tracestate parser logs a warning for
every malformed header, a log line any client could ask for.
"""

from __future__ import annotations

import random
import re
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# key: simple-key or tenant@system; value: printable ASCII but "," and "=", not ending in a space.
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_MAX_TRACESTATE_MEMBERS = 32
_MAX_TRACESTATE_CHARS = 512  # what the spec asks a vendor to pass on at least; longer is dropped here
# Past this much input (spaces and empty members included) none could make a header of 512 characters.
_MAX_TRACESTATE_INPUT = 4096


@dataclass(slots=True)
class Trace:
    """A request's place in a trace: what its access-log line names and what the upstream is told."""

    trace_id: str
    span_id: str
    """The gateway's span for this request (32 and 16 lowercase hex digits)."""
    sampled: bool
    """The head decision, passed on in the sampled flag: the caller's, or the ratio's for a new trace."""
    parent_id: str | None = None
    """The caller's span, when the request came with a valid traceparent."""
    state: str | None = None
    """The caller's tracestate, passed on as it came when valid."""
    recorded: bool = False
    """A span of this request is being exported (tracing enabled and sampled)."""

    def traceparent(self, span_id: str | None = None) -> str:
        """The header naming this request's span, or `span_id` (a child of it) as the parent."""
        return f"00-{self.trace_id}-{span_id or self.span_id}-{'01' if self.sampled else '00'}"


class HeadSampler:
    """Parent-based ratio sampling, as OpenTelemetry's ParentBased(TraceIdRatioBased(ratio)): a caller's
    decision is kept; a new trace is sampled when its id's low 64 bits fall under the ratio's bound, the same
    rule (and bound) as the SDK's, so every service using that sampler agrees on a trace id."""

    __slots__ = ("_always", "_bound")

    def __init__(self, ratio: float) -> None:
        # TraceIdRatioBased.get_bound_for_rate, without importing the SDK where tracing exports nothing.
        self._bound = round(ratio * (1 << 64))
        self._always = self._bound >= 1 << 64  # the default ratio, 1.0: no id to read

    def __call__(self, trace_id: str) -> bool:
        return self._always or int(trace_id[16:], 16) < self._bound


def new_ids() -> tuple[str, str]:
    """A new trace id and span id. One randbytes().hex() for both: a third of the time of formatting
    getrandbits() as hex for each, on every request."""
    ids = random.randbytes(24).hex()
    trace_id, span_id = ids[:32], ids[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # all zeros is invalid (once in 2**64)
        return new_ids()
    return trace_id, span_id


def new_span_id() -> str:
    return new_ids()[1]


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled), or None for a header the spec says to ignore. A later version's
    header is read by version 00's rules, as the spec asks, when it is at least as long and goes on with a
    dash."""
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def valid_tracestate(values: Sequence[str]) -> str | None:
    """The tracestate lines as one header when every list member is well formed (empty ones are allowed
    and dropped), else None: a vendor's state is passed on whole or not at all."""
    if sum(map(len, values)) > _MAX_TRACESTATE_INPUT:  # before any splitting: a client picks the size
        return None
    members = [m.strip(" \t") for line in values for m in line.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > _MAX_TRACESTATE_MEMBERS:
        return None
    if not all(_TRACESTATE_MEMBER.fullmatch(m) for m in members):
        return None
    keys = [m.partition("=")[0] for m in members]
    if len(set(keys)) != len(keys):
        return None
    joined = ",".join(members)
    return joined if len(joined) <= _MAX_TRACESTATE_CHARS else None


def continue_or_start(
    traceparent: Sequence[str], tracestate: Sequence[str], sample: HeadSampler, *, trust_inbound: bool = True
) -> Trace:
    """The request's trace: the caller's continued when it sent exactly one valid traceparent, else a new
    one; either way with a span id of the gateway's own."""
    if trust_inbound and len(traceparent) == 1:
        parsed = parse_traceparent(traceparent[0])
        if parsed is not None:
            trace_id, parent_id, sampled = parsed
            state = valid_tracestate(tracestate) if tracestate else None
            return Trace(trace_id, new_span_id(), sampled, parent_id, state)
    trace_id, span_id = new_ids()
    return Trace(trace_id, span_id, sample(trace_id))


_NONE: tuple[str, ...] = ()


class Propagation:
    """What every request does with trace context when `tracing.propagate` is on, before the filter chain
    and beside the request id: the caller's trace continued or a new one started, and the upstream's
    `traceparent` (and `tracestate`) set among the headers the gateway overrides. Not a filter: a layer of
    the chain costs some 4k instructions a request, a fifth of what propagation costs in all. With spans
    exported, filters/trace.py renames the upstream's parent once the server span exists."""

    __slots__ = ("_sample", "_trust")

    def __init__(self, sampler: HeadSampler, *, trust_inbound: bool) -> None:
        self._sample = sampler
        self._trust = trust_inbound

    def __call__(self, headers: CIMultiDictProxy[str], overrides: MutableMapping[str, str | None]) -> Trace:
        if TRACEPARENT in headers:  # most requests carry no trace context: getall only when there is one
            inbound = headers.getall(TRACEPARENT), headers.getall(TRACESTATE, _NONE)
            trace = continue_or_start(*inbound, self._sample, trust_inbound=self._trust)
        else:
            trace = continue_or_start(_NONE, _NONE, self._sample)
        if trace.state is not None or TRACESTATE in headers:
            overrides[TRACESTATE] = trace.state  # None: a tracestate never goes on without its parent
        overrides[TRACEPARENT] = trace.traceparent()
        return trace
