"""Did the shared limits stay shared under load? Rate-limit decisions that fell back, from the gateway's own
counters, and whether the Redis breaker opened.

Used for every scenario with a Redis, and the point of the `saturation` one (wrk -c50, one worker): at
saturation event-loop queueing must not be taken for a Redis failure, so with Redis healthy fewer than
TARGET_FALLBACK_SHARE of the decisions may fall back and the breaker must never open.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

# Names from gateway/observability/metrics.py (RATELIMIT, redis_up, REDIS_ERRORS, and the breaker's log event
# in gateway/ratelimit/resilient.py): update here if they are renamed there.
DECISIONS = "gateway_ratelimit_decisions_total"
FALLBACK = "fallback"
REDIS_UP = "gateway_redis_up"
REDIS_ERRORS = "gateway_redis_errors_total"
BREAKER_OPEN_EVENT = "redis_breaker_open"
TARGET_FALLBACK_SHARE = 0.001  # the target: < 0.1% of decisions


class MetricsError(RuntimeError):
    """The gateway's counters could not be read: the report says so instead of printing a share."""


@dataclass(frozen=True)
class Snapshot:
    """The gateway's rate-limit counters at one moment (summed over policies)."""

    decisions: int  # allowed + limited + shadow_limited (+ any other verdict but fallback)
    fallbacks: int  # decision="fallback": also counted under its verdict, so a subset of `decisions`
    redis_errors: int
    redis_up: float | None  # None when the gauge is not exported
    breaker_opens: int  # `redis_breaker_open` lines in the gateway's output so far
    found: bool = True  # False: /metrics had no DECISIONS counter


@dataclass(frozen=True)
class SaturationReport:
    requests: int
    decisions: int
    fallbacks: int
    redis_errors: int
    breaker_opens: int
    redis_up_after: float | None

    @property
    def fallback_share(self) -> float:
        return self.fallbacks / self.decisions if self.decisions else 0.0

    def line(self) -> str:
        verdict = "ok" if self.ok else "MISSED"
        up = "" if self.redis_up_after is None else f", gateway_redis_up={self.redis_up_after:g} at the end"
        return (
            f"fallback {self.fallback_share:.2%} of {self.decisions} decisions "
            f"(target < {TARGET_FALLBACK_SHARE:.1%}), breaker opened {self.breaker_opens} times "
            f"[{verdict}] ({self.fallbacks} fell back, {self.redis_errors} Redis errors counted{up})"
        )

    @property
    def ok(self) -> bool:
        return self.fallback_share < TARGET_FALLBACK_SHARE and self.breaker_opens == 0


def parse_metrics(text: str) -> tuple[int, int, int, float | None] | None:
    """(decisions, fallbacks, redis errors, redis_up) from a Prometheus text exposition; None when it has
    no decision counter (a labelled counter is exported only once a child exists, so before the first
    decision, or after a rename)."""
    decisions = fallbacks = errors = 0
    redis_up: float | None = None
    seen = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == DECISIONS:
                seen = True
                if sample.labels.get("decision") == FALLBACK:
                    fallbacks += int(sample.value)
                else:
                    decisions += int(sample.value)
            elif sample.name == REDIS_ERRORS:
                errors += int(sample.value)
            elif sample.name == REDIS_UP:  # one per process under --workers: the lowest says "any open"
                redis_up = sample.value if redis_up is None else min(redis_up, sample.value)
    return (decisions, fallbacks, errors, redis_up) if seen else None


def breaker_opens(log: Path) -> int:
    """`redis_breaker_open` events in the gateway's output (JSON lines; anything else is skipped)."""
    count = 0
    with log.open(errors="replace") as lines:
        for line in lines:
            if BREAKER_OPEN_EVENT not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            count += isinstance(entry, dict) and entry.get("event") == BREAKER_OPEN_EVENT
    return count


def snapshot(metrics_url: str, log: Path) -> Snapshot:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(metrics_url, timeout=10) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except (OSError, urllib.error.URLError) as exc:
        raise MetricsError(f"cannot read {metrics_url}: {exc}") from exc
    parsed = parse_metrics(text)
    if parsed is None:
        return Snapshot(0, 0, 0, None, breaker_opens(log), found=False)
    return Snapshot(*parsed, breaker_opens(log))


def report(before: Snapshot, after: Snapshot, requests: int) -> SaturationReport:
    if not after.found:  # without the counter every share would read 0%: say so rather than pass
        raise MetricsError(f"no {DECISIONS} in the gateway's /metrics after {requests} requests")
    return SaturationReport(
        requests=requests,
        decisions=after.decisions - before.decisions,
        fallbacks=after.fallbacks - before.fallbacks,
        redis_errors=after.redis_errors - before.redis_errors,
        breaker_opens=after.breaker_opens - before.breaker_opens,
        redis_up_after=after.redis_up,
    )
