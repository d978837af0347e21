"""Prometheus metrics, defined once, with label children cached so a request costs a few dict lookups.

With `--workers N` the supervisor points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers
start, so prometheus-client writes every worker's values there and one scrape of any worker sums them all.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import __version__

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
KNOWN_CREDENTIAL_TYPES = frozenset({"agent", "direct", "delegate", "accesskey", "jwt"})
UNMATCHED = "unmatched"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REDIS_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

REQUESTS = Counter("gateway_requests_total", "Requests answered.", ["route", "method", "code"])
REQUEST_DURATION = Histogram(
    "gateway_request_duration_seconds",
    "Time from the request reaching the gateway to the last byte of the response.",
    ["route", "method", "code_class"],
    buckets=_LATENCY,
)
UPSTREAM_DURATION = Histogram(
    "gateway_upstream_duration_seconds",
    "Time from sending the request upstream to its response headers.",
    ["route"],
    buckets=_LATENCY,
)
REQUEST_BYTES = Counter("gateway_request_bytes_total", "Request body bytes received.", ["route"])
RESPONSE_BYTES = Counter("gateway_response_bytes_total", "Response body bytes sent.", ["route"])
IN_FLIGHT = Gauge("gateway_in_flight_requests", "Requests being handled.", multiprocess_mode="livesum")
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total",
    "Upstream failures: connect, timeout, reset, protocol, ejected (every target of the pool was out), or "
    "pool_full (upstream.pool.max_websockets streams open already).",
    ["route", "kind"],
)
# WebSocket streams (proxy/ws_relay.py): direction is to_upstream or to_client.
WEBSOCKET_CONNECTIONS = Gauge(
    "gateway_websocket_connections", "WebSocket streams open.", ["route"], multiprocess_mode="livesum"
)
WEBSOCKET_MESSAGES = Counter(
    "gateway_websocket_messages_total", "WebSocket messages relayed.", ["route", "direction"]
)
WEBSOCKET_BYTES = Counter(
    "gateway_websocket_bytes_total", "WebSocket message payload bytes relayed.", ["route", "direction"]
)
WEBSOCKET_CLOSES = Counter(
    "gateway_websocket_closes_total",
    "WebSocket streams ended, by who ended them (client, upstream or gateway) and the close code (1006: the "
    "connection was lost without one; application codes as 3xxx and 4xxx).",
    ["route", "closed_by", "code"],
)
WEBSOCKET_DURATION = Histogram(
    "gateway_websocket_duration_seconds",
    "How long WebSocket streams lasted, from the upgrade to the close.",
    ["route"],
    buckets=(1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0),
)
# Per target of an upstream pool (routes with one upstream URL have the per-route metrics only). The target
# label is a URL from the config, which config.py keeps free of credentials.
TARGET_REQUESTS = Counter(
    "gateway_upstream_target_requests_total",
    "Attempts sent to each target of an upstream pool (a retry counts again).",
    ["pool", "target"],
)
TARGET_FAILURES = Counter(
    "gateway_upstream_target_failures_total",
    "Attempts to a pool's target that got no response: connect, timeout, reset or protocol.",
    ["pool", "target", "kind"],
)
TARGET_EJECTIONS = Counter(
    "gateway_upstream_target_ejections_total",
    "Times passive health took a pool's target out of rotation.",
    ["pool", "target"],
)
TARGET_EJECTED = Gauge(
    "gateway_upstream_target_ejected",
    "1 while passive health keeps a pool's target out of rotation (summed over workers).",
    ["pool", "target"],
    multiprocess_mode="livesum",
)
AUTH = Counter("gateway_auth_total", "Authentication outcomes.", ["result", "reason", "credential_type"])
RATELIMIT = Counter(
    "gateway_ratelimit_decisions_total",
    "Rate-limit decisions: allowed, limited, shadow_limited, fallback.",
    ["policy", "decision"],
)
REDIS_DURATION = Histogram(
    "gateway_redis_duration_seconds", "Round trips to Redis for rate limits.", buckets=_REDIS_LATENCY
)
REDIS_ERRORS = Counter("gateway_redis_errors_total", "Failed or timed-out rate-limit calls to Redis.")
BUILD_INFO = Gauge(
    "gateway_build_info", "Version of the gateway.", ["version", "python"], multiprocess_mode="max"
)
# livemax: a dead worker's hash leaves the scrape. A replaced hash stays at 0 in the workers' files (a
# multiprocess gauge cannot be removed), so a query counts the series at 1.
CONFIG_INFO = Gauge(
    "gateway_config_info",
    "Hash of the loaded configuration (1; 0 once replaced).",
    ["hash"],
    multiprocess_mode="livemax",
)
TEAM_REQUESTS = Counter("gateway_team_requests_total", "Requests per team (opt-in, capped).", ["team"])
# Not a `team` label value: any printable text can be a team id, so no value is safe from meaning a real team.
TEAM_OVERFLOW = Counter(
    "gateway_team_requests_overflow_total", "Requests of teams past metrics.team_cap, not counted per team."
)
LOCAL_KEYS = Gauge(
    "gateway_ratelimit_local_keys", "Keys in the in-process rate-limit table.", multiprocess_mode="livesum"
)
LOCAL_MAX_KEYS = Gauge(
    "gateway_ratelimit_local_max_keys",
    "Keys the in-process rate-limit table may hold (rate_limit.local_max_keys).",
    multiprocess_mode="livesum",
)
LOCAL_EVICTIONS = Counter(
    "gateway_ratelimit_local_evictions_total",
    "Keys forgotten by the full in-process rate-limit table (least recently used first).",
)


# Tracing's export queue (observability/tracing.py): registered with tracing off too, where they stay 0.
SPANS_EXPORTED = Counter("gateway_tracing_spans_exported_total", "Spans the trace collector accepted.")
SPANS_DROPPED = Counter(
    "gateway_tracing_spans_dropped_total",
    "Spans lost: queue_full (the export queue was full: the collector is slow or down) or export_failed "
    "(the collector refused them or could not be reached within tracing.export_timeout).",
    ["reason"],
)
for _reason in ("queue_full", "export_failed"):
    SPANS_DROPPED.labels(_reason)  # at 0 from the start, tracing on or off: the first drop shows in rate()


@functools.cache
def redis_up() -> Gauge:
    """Registered by the first gateway that has Redis configured: without Redis the gauge would read 0,
    a permanent false "Redis down" on dashboards."""
    return Gauge("gateway_redis_up", "1 while Redis answers (breaker closed).", multiprocess_mode="livemin")


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


def credential_type_label(credential_type: str | None) -> str:
    if credential_type is None:
        return "none"
    return credential_type if credential_type in KNOWN_CREDENTIAL_TYPES else "other"


def close_code_label(code: int) -> str:
    """A close code as a bounded label: the protocol's own codes as they are, application codes by range."""
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


def code_class(status: int) -> str:
    return f"{status // 100}xx"


class RequestMetrics:
    """The per-request metrics, with each label combination's children looked up once and then reused."""

    def __init__(self, *, team_cap: int = 0) -> None:
        self._by_request: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._by_route: dict[str, tuple[Counter, Counter, Histogram]] = {}
        self._team_cap = team_cap
        self._teams: dict[str, Counter] = {}
        self._children: dict[tuple[object, ...], Any] = {}

    def request(
        self,
        route: str,
        method: str,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        trace_id: str | None = None,
    ) -> None:
        """`trace_id`: a recorded trace's, kept as the duration's exemplar (shown to OpenMetrics scrapes)."""
        label = method_label(method)  # the key too: any token is a method, and the cache must stay bounded
        key = (route, label, status)
        children = self._by_request.get(key)
        if children is None:
            children = self._by_request[key] = (
                REQUESTS.labels(route, label, str(status)),
                REQUEST_DURATION.labels(route, label, code_class(status)),
            )
        children[0].inc()
        children[1].observe(seconds, {"trace_id": trace_id} if trace_id is not None else None)
        per_route = self._route(route)
        if bytes_in:
            per_route[0].inc(bytes_in)
        if bytes_out:
            per_route[1].inc(bytes_out)

    def upstream(self, route: str, seconds: float, trace_id: str | None = None) -> None:
        self._route(route)[2].observe(seconds, {"trace_id": trace_id} if trace_id is not None else None)

    def upstream_error(self, route: str, kind: str) -> None:
        self._child(UPSTREAM_ERRORS, route, kind).inc()

    def auth(self, result: str, reason: str, credential_type: str | None) -> None:
        self._child(AUTH, result, reason, credential_type_label(credential_type)).inc()

    def ratelimit(self, policy: str, decision: str) -> None:
        self._child(RATELIMIT, policy, decision).inc()

    def _child(self, metric: Counter, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def team(self, team: str) -> None:
        """Counted per team only up to the cap; later teams are counted together in TEAM_OVERFLOW, so the
        series stay bounded."""
        child = self._teams.get(team)
        if child is None:
            if len(self._teams) >= self._team_cap:  # nothing more is stored for teams past the cap
                TEAM_OVERFLOW.inc()
                return
            child = self._teams[team] = TEAM_REQUESTS.labels(team)
        child.inc()

    @property
    def teams_enabled(self) -> bool:
        return self._team_cap > 0

    def _route(self, route: str) -> tuple[Counter, Counter, Histogram]:
        children = self._by_route.get(route)
        if children is None:
            children = self._by_route[route] = (
                REQUEST_BYTES.labels(route),
                RESPONSE_BYTES.labels(route),
                UPSTREAM_DURATION.labels(route),
            )
        return children


class LocalTableMetrics:
    """The in-process rate-limit table, reported from its size and running eviction count (read on a timer,
    not per request)."""

    def __init__(self, max_keys: int) -> None:
        LOCAL_MAX_KEYS.set(max_keys)
        self._evictions = 0

    def report(self, keys: int, evictions: int) -> None:
        LOCAL_KEYS.set(keys)
        if evictions > self._evictions:
            LOCAL_EVICTIONS.inc(evictions - self._evictions)
            self._evictions = evictions


def config_hash(canonical_json: str) -> str:
    return hashlib.sha256(canonical_json.encode()).hexdigest()[:16]


CONFIG_RELOADS = Counter(
    "gateway_config_reloads_total", "Config reloads (SIGHUP, changed key files) by result.", ["result"]
)
CONFIG_RELOAD_TIME = Gauge(
    "gateway_config_last_reload_success_timestamp_seconds",
    "When the running config was last applied (start or reload), in Unix time.",
    multiprocess_mode="max",
)
for _result in ("applied", "refused"):
    CONFIG_RELOADS.labels(_result)  # at 0 from the start, so the first refusal shows in rate()


def config_reloaded(*, applied: bool) -> None:
    CONFIG_RELOADS.labels("applied" if applied else "refused").inc()
    if applied:
        CONFIG_RELOAD_TIME.set_to_current_time()


def retire_config_info(config_digest: str) -> None:
    """The replaced config's info series: gone, or at 0 where other processes' files still hold it."""
    CONFIG_INFO.labels(config_digest).set(0)
    if not os.environ.get(MULTIPROC_ENV):
        CONFIG_INFO.remove(config_digest)


def publish_info(config_digest: str) -> None:
    """Build and config info (the known label sets at 0: known_series.py)."""
    BUILD_INFO.labels(__version__, f"{sys.version_info.major}.{sys.version_info.minor}").set(1)
    CONFIG_INFO.labels(config_digest).set(1)
    CONFIG_RELOAD_TIME.set_to_current_time()


def wipe_earlier_runs(directory: str) -> None:
    """prometheus-client sums every file in the multiprocess directory, so one left by an earlier run would
    count again (its docs: wipe the directory between runs). Files of live processes stay: this one's own
    (created when this module was imported) and those of any other process sharing the directory."""
    for path in Path(directory).glob("*.db"):
        pid = path.stem.rpartition("_")[2]  # counter_1234.db, gauge_livesum_1234.db
        if not (pid.isdigit() and _alive(int(pid))):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def scrape(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition of this process's registry, or every worker's in multiprocess mode, in the format the
    scraper's Accept header asks for: OpenMetrics carries the duration histograms' trace exemplars (single
    process only: prometheus-client keeps no exemplars in multiprocess files)."""
    try:
        encode, content_type = choose_encoder(accept or "")
    except (TypeError, ValueError):  # prometheus-client fails on a malformed version= parameter
        encode, content_type = choose_encoder("")
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return encode(registry), content_type
    return encode(REGISTRY), content_type
