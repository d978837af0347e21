"""One gateway instance wired together. The filter order, the whole per-request path, is fixed here."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from aiohttp import hdrs, web
from redis.exceptions import RedisError

from gateway import logs, redis_client
from gateway.auth.setup import build_authenticator
from gateway.config import GatewayConfig
from gateway.context import RequestContext
from gateway.filters.admission import Admission
from gateway.filters.auth import AuthFilter
from gateway.filters.errors import ErrorFilter
from gateway.filters.observe import ObserveFilter
from gateway.filters.ratelimit import RateLimitFilter
from gateway.filters.route import RouteFilter, is_websocket_upgrade
from gateway.forwarding import TrustedProxies
from gateway.health import UpstreamHealth
from gateway.observability import metrics
from gateway.pipeline import chain
from gateway.proxy.client import UpstreamPool
from gateway.proxy.http import HttpProxy
from gateway.proxy.upstream import make_session, make_websocket_session
from gateway.proxy.websocket import WebSocketProxy
from gateway.ratelimit.ip_prefix import IpPrefixes
from gateway.ratelimit.limiter import RateLimiter
from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.policies import compile_policies
from gateway.ratelimit.redis_backend import RedisBackend
from gateway.ratelimit.resilient import ResilientBackend
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import accept_or_new
from gateway.routing import RouteTable, compile_routes

log = structlog.get_logger("gateway.app")

# Bounds start-up when Redis does not answer (its client also gives up on connect after its own timeout).
_REDIS_PREPARE_TIMEOUT = 5.0
# How often the limiter table's expired entries are dropped without traffic, and its metrics updated.
LOCAL_TABLE_UPKEEP = 1.0


class Gateway:
    """Must be built inside the running event loop (it owns the upstream connection pool)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        routes = compile_routes(config)
        pool = config.upstream.pool
        self.upstream_pool = UpstreamPool(
            max_connections=pool.max_connections,
            max_per_origin=pool.max_connections_per_host,
            keepalive_timeout=pool.keepalive_timeout,
            tls_verify=config.upstream.tls_verify,
        )
        self.session = make_session(config.upstream)
        self.websocket_session = make_websocket_session(config.upstream)
        self.redis = redis_client.connect(config.redis.url) if config.redis.url else None
        self.health = UpstreamHealth(
            {route.upstream for route in routes},
            probe_interval=config.health.upstream_probe_interval,
            max_age=config.health.upstream_max_age,
        )
        self.admission = Admission(
            max_in_flight=config.server.max_in_flight,
            max_header_bytes=int(config.limits.max_header_bytes),
            max_header_count=config.limits.max_header_count,
        )
        self._trusted = TrustedProxies(config.server.trusted_proxies)
        self._server_header = config.server.server_header
        self._http = HttpProxy(
            self.upstream_pool,
            self.health,
            error_format=config.errors.format,
            max_error_body_bytes=int(config.upstream.max_error_body_bytes),
        )
        self._websocket = WebSocketProxy(self.websocket_session, self.health)
        self.metrics = metrics.RequestMetrics(
            team_cap=config.metrics.team_cap if config.metrics.per_team else 0
        )
        metrics.publish_info(metrics.config_hash(config.model_dump_json()), [route.name for route in routes])
        limits = config.rate_limit
        self.shared_limits: ResilientBackend | None = None
        self._redis_limits: RedisBackend | None = None
        # One in-process table, one bound: the local policies' counts and the Redis fallback's.
        self.limiter_table = MemoryBackend(max_keys=limits.local_max_keys)
        self._upkeep: asyncio.Task[None] | None = None
        if self.redis is not None:
            redis_limits = self._redis_limits = RedisBackend(self.redis)
            self.shared_limits = ResilientBackend(
                redis_limits,
                self.limiter_table,
                budget=limits.redis_budget,
                failure_threshold=limits.breaker_failures,
                reset_after=limits.breaker_reset,
                instances=limits.instances,
                on_fallback=lambda policy, _mode: self.metrics.ratelimit(policy, "fallback"),
                on_redis_call=self._redis_call,
            )
            metrics.redis_up().set(1)  # the breaker starts closed; calls update it from then on
        self.limiter = RateLimiter(
            compile_policies(limits.policies), local=self.limiter_table, shared=self.shared_limits
        )
        ip_prefixes = IpPrefixes(ipv4=limits.ipv4_prefix, ipv6=limits.ipv6_prefix)
        self.observe = ObserveFilter(
            self.metrics,
            logs.access_logger(config.logging.format) if config.logging.access_log else None,
            secret_params=config.logging.redact_query_params,
        )
        # Introspection calls the upstream through its pool; JWKS fetches use the authenticator's own session.
        self.authenticator = build_authenticator(config, self.session, self.redis)
        self._handle = chain(
            [
                self.observe,  # outermost: sees every request's final status and duration
                ErrorFilter(config.errors.format),  # whatever fails below answers in the envelope
                self.admission,
                RouteFilter(RouteTable(routes)),
                RateLimitFilter(
                    self.limiter, before_auth=True, ietf_headers=limits.ietf_headers, ip_prefixes=ip_prefixes
                ),
                AuthFilter(self.authenticator, config.auth),
                RateLimitFilter(
                    self.limiter, before_auth=False, ietf_headers=limits.ietf_headers, ip_prefixes=ip_prefixes
                ),
            ],
            self._forward,
        )

    async def prepare(self) -> None:
        """Before serving: the rate-limit connection open and its scripts loaded. A Redis that does not
        answer yet is not fatal: each policy's on_redis_error applies until it does."""
        if self._redis_limits is None:
            return
        try:
            async with asyncio.timeout(_REDIS_PREPARE_TIMEOUT):
                await self._redis_limits.prepare()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis_unavailable_at_start", error=type(exc).__name__)

    def start(self) -> None:
        """Background work while serving: upstream probes, and the limiter table's upkeep."""
        self.health.start()
        self._upkeep = asyncio.create_task(self._keep_local_table())

    async def _keep_local_table(self) -> None:
        table = self.limiter_table
        report = metrics.LocalTableMetrics(table.max_keys)
        while True:
            try:
                table.expire()
                report.report(len(table), table.evictions)
            except Exception:  # a bug here must not end the upkeep for the life of the process
                log.exception("local_table_upkeep_failed")
            await asyncio.sleep(LOCAL_TABLE_UPKEEP)

    def _redis_call(self, seconds: float, failed: bool) -> None:
        metrics.REDIS_DURATION.observe(seconds)
        if failed:
            metrics.REDIS_ERRORS.inc()
        assert self.shared_limits is not None
        metrics.redis_up().set(1 if self.shared_limits.redis_up else 0)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = request.remote
        trusted = self._trusted.trusts(peer)
        # Every X-Forwarded-For line: a proxy that adds a line of its own must not leave a forged one first.
        forwarded_for = ", ".join(request.headers.getall("X-Forwarded-For", ())) if trusted else ""
        client_ip = self._trusted.client_ip(peer, forwarded_for) if trusted else peer
        ctx = RequestContext(
            request_id=accept_or_new(request.headers.get(REQUEST_ID_HEADER)),
            started=time.perf_counter(),
            client_ip=client_ip,
            peer_trusted=trusted,
            target=request.raw_path,
        )
        ctx.response_headers[REQUEST_ID_HEADER] = ctx.request_id
        ctx.response_headers[hdrs.SERVER] = self._server_header
        return await self._handle(request, ctx)

    async def _forward(self, request: web.BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        assert ctx.route is not None
        if ctx.route.websocket and is_websocket_upgrade(request):
            return await self._websocket(request, ctx)
        return await self._http(request, ctx)

    async def close(self) -> None:
        await self.health.stop()
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        await self.limiter.close()
        await self.upstream_pool.close()
        await self.session.close()
        await self.websocket_session.close()
        await self.authenticator.close()
        if self.redis is not None:
            await self.redis.aclose()
