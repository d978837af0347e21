"""The parts of a gateway that outlive a config reload: connection pools, the Redis client, rate-limit state.

A reload builds a new Gateway (app.py) for new requests. Each part here is handed on to it when the
settings it was built from are unchanged, so rate-limit counts, open upstream connections and the breaker's
state survive the reload; a part whose settings changed is built afresh, and the old one is closed once the
requests of the generation that used it are done (`close_replaced`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import redis.asyncio
import structlog
from opentelemetry.trace import SpanKind

from gateway import redis_client
from gateway.auth.authenticator import Authenticator
from gateway.auth.setup import build_authenticator
from gateway.config import GatewayConfig, RateLimitConfig, TracingConfig
from gateway.observability import metrics, spans
from gateway.proxy.client import UpstreamPool
from gateway.proxy.targets import TargetPool
from gateway.proxy.upstream import WebSocketPool, make_session
from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.redis_backend import RedisBackend
from gateway.ratelimit.resilient import ResilientBackend
from gateway.reload import auth_files, stamps, upstream_tls_files
from gateway.tls import upstream_context

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracer

log = structlog.get_logger("gateway.resources")

T = TypeVar("T")
_REDIS_SPAN = {"db.system.name": "redis", "db.operation.name": "EVALSHA"}
# How often the limiter table's expired entries are dropped without traffic, and its metrics updated.
LOCAL_TABLE_UPKEEP = 1.0
# Upstream keys read per request from the compiled routes; the pools and sessions are built from the rest.
_PER_REQUEST_UPSTREAM_KEYS = frozenset(
    {
        "url",
        "pool_name",
        "preserve_host",
        "timeouts",
        "retries",
        "max_error_body_bytes",
        "request_buffer_bytes",
    }
)


@dataclass(eq=False)
class _Part:
    key: Hashable
    value: Any
    close: Callable[[], Awaitable[None]] | None


class Resources:
    """Built in the running event loop. `previous` is the running generation's: its parts whose settings are
    unchanged are taken over, and the caller closes the rest (`close_unshared`) once the requests that use
    them are done."""

    def __init__(self, config: GatewayConfig, previous: Resources | None = None) -> None:
        self._parts: dict[str, _Part] = {}
        self._previous = previous._parts if previous is not None else {}
        upstream = config.upstream
        # With the upstream TLS files as they are now: a renewed client certificate means new pools.
        per_request = set(_PER_REQUEST_UPSTREAM_KEYS & type(upstream).model_fields.keys())
        pools = (upstream.model_dump_json(exclude=per_request), stamps(upstream_tls_files(config)))
        # The three's SSL context (upstream.tls_verify, upstream.tls), built and replaced with them.
        upstream_tls: ssl.SSLContext = self._part(
            "upstream_tls", pools, lambda: upstream_context(upstream), None
        )
        self.upstream_pool: UpstreamPool = self._part(
            "upstream_pool",
            pools,
            lambda: UpstreamPool(
                max_connections=upstream.pool.max_connections,
                max_per_origin=upstream.pool.max_connections_per_host,
                keepalive_timeout=upstream.pool.keepalive_timeout,
                ssl_context=upstream_tls,
            ),
            UpstreamPool.close,
        )
        self.session: aiohttp.ClientSession = self._part(
            "session", pools, lambda: make_session(upstream, upstream_tls), aiohttp.ClientSession.close
        )
        self.websocket_pool: WebSocketPool = self._part(
            "websocket_pool", pools, lambda: WebSocketPool(upstream, upstream_tls), WebSocketPool.close
        )
        url = config.redis.url
        self.redis: redis.asyncio.Redis | None = self._part(
            "redis", url, lambda: redis_client.connect(url) if url else None, _close_redis
        )
        limits = config.rate_limit
        # One in-process table, one bound: the local policies' counts and the Redis fallback's.
        self.limiter_table: LimiterTable = self._part(
            "limiter_table",
            limits.local_max_keys,
            lambda: LimiterTable(limits.local_max_keys),
            LimiterTable.close,
        )
        # Each pool's balancer with its ejections and in-flight counts, kept while its settings are unchanged.
        self.target_pools: dict[str, TargetPool] = {
            name: self._part(
                f"upstream_pools.{name}",
                pool.model_dump_json(),
                functools.partial(TargetPool, name, pool),
                TargetPool.close,
            )
            for name, pool in config.upstream_pools.items()
        }
        # With its caches (verified tokens, JWKS keys, introspection answers), kept while neither the auth
        # settings nor their files change: a reload for a certificate does not forget every credential.
        authentication = (
            config.auth.model_dump_json(),
            config.upstream.url,  # introspection's default address
            id(self.session),
            id(self.redis),
            stamps(auth_files(config)),
        )
        self.authenticator: Authenticator = self._part(
            "authenticator",
            authentication,
            lambda: build_authenticator(config, self.session, self.redis),
            Authenticator.close,
        )
        self.request_metrics: metrics.RequestMetrics = self._part(
            "request_metrics",
            (config.metrics.per_team, config.metrics.team_cap),
            lambda: metrics.RequestMetrics(
                team_cap=config.metrics.team_cap if config.metrics.per_team else 0
            ),
            None,
        )
        tracing_config = config.tracing
        self.tracer: Tracer | None = self._part(
            "tracer",
            tracing_config.part_key(),
            lambda: _tracer(tracing_config) if tracing_config.enabled else None,
            _close_tracer,
        )
        redis_parts = (id(self.redis), id(self.limiter_table), id(self.request_metrics))
        # The breaker's settings, and what it wraps: a Redis backend is only ever used through its breaker.
        breaker = (
            *redis_parts,
            limits.redis_budget,
            limits.breaker_failures,
            limits.breaker_reset,
            limits.instances,
        )
        self.shared_limits: SharedLimits | None = self._part(
            "shared_limits",
            breaker,
            lambda: (
                SharedLimits(self.redis, self.limiter_table.table, self.request_metrics, limits)
                if self.redis is not None
                else None
            ),
            SharedLimits.close,
        )
        self._previous = {}

    def _part(
        self, name: str, key: Hashable, build: Callable[[], T], close: Callable[[Any], Awaitable[None]] | None
    ) -> T:
        old = self._previous.get(name)
        if old is not None and old.key == key:
            self._parts[name] = old
            return old.value  # type: ignore[no-any-return]
        value = build()
        closer = (lambda: close(value)) if close is not None and value is not None else None
        self._parts[name] = _Part(key, value, closer)
        if old is not None:
            log.info("reload_rebuilt", part=name)
        return value

    def start(self) -> None:
        """Background work of the parts built for this generation (taken-over ones already run theirs)."""
        self.limiter_table.start()

    async def close_unshared(self, others: Iterable[Resources]) -> None:
        """Close the parts none of `others` uses (dependents first): a retired generation's parts that the
        generations still serving did not take over."""
        kept = {id(part) for other in others for part in other._parts.values()}
        await self._close(part for part in self._parts.items() if id(part[1]) not in kept)

    async def close(self) -> None:
        await self._close(self._parts.items())

    @staticmethod
    async def _close(parts: Iterable[tuple[str, _Part]]) -> None:
        for name, part in reversed(list(parts)):
            close, part.close = part.close, None  # parts are shared between generations: close once
            if close is None:
                continue
            try:
                await close()
            except Exception:  # one part failing to close must not leave the others open
                log.exception("resource_close_failed", part=name)


class LimiterTable:
    """The in-process limiter table and its upkeep: expired entries dropped without traffic, metrics kept."""

    def __init__(self, max_keys: int) -> None:
        self.table = MemoryBackend(max_keys=max_keys)
        self._upkeep: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._upkeep is None:
            self._upkeep = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        table = self.table
        report = metrics.LocalTableMetrics(table.max_keys)
        while True:
            try:
                table.expire()
                report.report(len(table), table.evictions)
            except Exception:  # a bug here must not end the upkeep for the life of the process
                log.exception("local_table_upkeep_failed")
            await asyncio.sleep(LOCAL_TABLE_UPKEEP)

    async def close(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        await self.table.close()


class SharedLimits:
    """The Redis rate-limit backend behind its breaker, which falls back to the in-process table."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        table: MemoryBackend,
        request_metrics: metrics.RequestMetrics,
        limits: RateLimitConfig,
    ) -> None:
        self.redis_backend = RedisBackend(client)
        self.backend = ResilientBackend(
            self.redis_backend,
            table,
            budget=limits.redis_budget,
            failure_threshold=limits.breaker_failures,
            reset_after=limits.breaker_reset,
            instances=limits.instances,
            on_fallback=lambda policy, _mode: request_metrics.ratelimit(policy, "fallback"),
            on_redis_call=self._redis_call,
        )
        metrics.redis_up().set(1)  # the breaker starts closed; calls update it from then on

    def _redis_call(self, seconds: float, failed: bool) -> None:
        # Called in the request's task, so a traced request gets the round trip as a child span.
        error = "redis_error" if failed else None
        spans.record("redis ratelimit", seconds, SpanKind.CLIENT, _REDIS_SPAN, error=error)
        metrics.REDIS_DURATION.observe(seconds)
        if failed:
            metrics.REDIS_ERRORS.inc()
        metrics.redis_up().set(1 if self.backend.redis_up else 0)

    async def close(self) -> None:
        # Not ResilientBackend.close: that would also close the in-process table, a part of its own.
        await self.redis_backend.close()


def _tracer(config: TracingConfig) -> Tracer:
    # Imported only when tracing exports: the OpenTelemetry SDK and OTLP exporter take ~0.3 s to import.
    from gateway.observability.tracing import Tracer

    return Tracer(config)


async def _close_tracer(tracer: Tracer) -> None:
    await tracer.close()


async def _close_redis(client: redis.asyncio.Redis) -> None:
    await client.aclose()
