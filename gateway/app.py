"""One gateway instance wired together. The filter order, the whole per-request path, is fixed here."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import hdrs, web
from redis.exceptions import RedisError

from gateway import logs
from gateway.config import GatewayConfig
from gateway.context import RequestContext
from gateway.filters.admission import Admission
from gateway.filters.auth import AuthFilter
from gateway.filters.cors import build_cors_filter
from gateway.filters.errors import ErrorFilter
from gateway.filters.observe import ObserveFilter
from gateway.filters.ratelimit import RateLimitFilter
from gateway.filters.route import RouteFilter, is_websocket_upgrade
from gateway.filters.trace import ServerSpanFilter
from gateway.forwarding import TrustedProxies
from gateway.health import UpstreamHealth
from gateway.observability import metrics
from gateway.observability.known_series import zero_known_series
from gateway.observability.trace_context import HeadSampler, Propagation
from gateway.pipeline import chain
from gateway.proxy.http import HttpProxy
from gateway.proxy.targets import UpstreamTargets
from gateway.proxy.websocket import WebSocketProxy
from gateway.proxy.ws_relay import CLOSE_REPLY_TIMEOUT
from gateway.ratelimit.ip_prefix import IpPrefixes
from gateway.ratelimit.limiter import RateLimiter
from gateway.ratelimit.policies import compile_policies
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import accept_or_new
from gateway.resources import Resources
from gateway.routing import Route, RouteTable, compile_routes

log = structlog.get_logger("gateway.app")

# Bounds start-up when Redis does not answer (its client also gives up on connect after its own timeout).
_REDIS_PREPARE_TIMEOUT = 5.0
# How often a retiring generation looks whether its last request is done: first, and at the longest.
_RETIRE_POLL = 0.1
_RETIRE_POLL_MAX = 2.0


class Gateway:
    """One generation of the gateway: everything built from one config. A reload builds the next one around
    the same long-lived `Resources`; the old one finishes its requests and is then retired (server.py). Must
    be built inside the running event loop."""

    def __init__(self, config: GatewayConfig, resources: Resources | None = None) -> None:
        self.config = config
        routes = compile_routes(config)
        self.resources = resources = resources or Resources(config)
        self.upstream_pool = resources.upstream_pool
        self.session = resources.session
        self.limiter_table = resources.limiter_table.table
        # Upstream pools: target choice, passive health.
        self.targets = UpstreamTargets(resources.target_pools, routes)
        self.health = UpstreamHealth(
            self.targets.route_targets,
            probe_interval=config.health.upstream_probe_interval,
            max_age=config.health.upstream_max_age,
            ejected=self.targets.ejected,
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
            self.targets,
            error_format=config.errors.format,
            max_error_body_bytes=int(config.upstream.max_error_body_bytes),
        )
        self._websocket = WebSocketProxy(
            resources.websocket_pool,
            self.health,
            self.targets,
            compression=config.websocket.compression,
            error_format=config.errors.format,
            max_error_body_bytes=int(config.upstream.max_error_body_bytes),
            send_timeout=config.server.send_timeout,
        )
        self.metrics = resources.request_metrics
        self._routes = {route.name: route for route in routes}
        limits = config.rate_limit
        shared = resources.shared_limits
        self.shared_limits = shared.backend if shared is not None else None
        self.limiter = RateLimiter(
            compile_policies(limits.policies), local=self.limiter_table, shared=self.shared_limits
        )
        ip_prefixes = IpPrefixes(ipv4=limits.ipv4_prefix, ipv6=limits.ipv6_prefix)
        self.observe = ObserveFilter(
            self.metrics,
            logs.access_logger(config.logging.format) if config.logging.access_log else None,
            secret_params=config.logging.redact_query_params,
        )
        self.authenticator = resources.authenticator
        cors = build_cors_filter(config, routes)  # None unless some CORS policy allows an origin
        tracing = config.tracing
        self._trace_context = (
            Propagation(HeadSampler(tracing.sample_ratio), trust_inbound=tracing.trust_inbound)
            if tracing.propagate
            else None
        )
        tracer = resources.tracer  # None unless tracing.enabled (which needs propagate)
        self._handle = chain(
            [
                self.observe,  # outermost: sees every request's final status and duration
                # The server span of a sampled request, when spans are exported.
                *([ServerSpanFilter(tracer)] if tracer is not None else []),
                ErrorFilter(config.errors.format),  # whatever fails below answers in the envelope
                # Preflights answered before admission, auth and limits; CORS headers on every answer below.
                *([cors] if cors is not None else []),
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
        shared = self.resources.shared_limits
        if shared is None:
            return
        try:
            async with asyncio.timeout(_REDIS_PREPARE_TIMEOUT):
                await shared.redis_backend.prepare()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis_unavailable_at_start", error=type(exc).__name__)

    @property
    def config_digest(self) -> str:
        return metrics.config_hash(self.config.model_dump_json())

    def start(self) -> None:
        """Serving from now on: upstream probes, the long-lived parts' upkeep, this config's metrics."""
        metrics.publish_info(self.config_digest)
        zero_known_series(self.config, self._routes.values())
        self.health.start()
        self.resources.start()

    async def retire(self) -> None:
        """After a reload: stop probing at once, then return once the requests this generation took are
        done, event streams included however long they last; the caller then closes the long-lived parts
        that no generation still serving uses."""
        await self.health.stop()
        await self.idle(pause_max=_RETIRE_POLL_MAX)

    async def idle(self, *, pause_max: float, deadline: float | None = None) -> bool:
        """Return once no request of this generation is in flight (True), or at `deadline` (loop time) with
        some still are (False). Polled: an event set by the last request out would cost every request; the
        pause doubles up to `pause_max`, so a generation kept by hour-long streams costs next to nothing."""
        loop = asyncio.get_running_loop()
        pause = min(_RETIRE_POLL, pause_max)
        while self.admission.in_flight:
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    return False
                pause = min(pause, left)
            await asyncio.sleep(pause)
            pause = min(pause * 2, pause_max)
        return True

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
        if self._trace_context is not None:  # for the access log and the upstream, like the request id
            ctx.trace = self._trace_context(request.headers, ctx.upstream_header_overrides)
        ctx.response_headers[REQUEST_ID_HEADER] = ctx.request_id
        ctx.response_headers[hdrs.SERVER] = self._server_header
        response = await self._handle(request, ctx)
        if self.admission.draining:  # its connection is not to be used again (server.stop)
            response.force_close()
        return response

    async def _forward(self, request: web.BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        assert ctx.route is not None
        if ctx.route.websocket and is_websocket_upgrade(request):
            return await self._websocket(request, ctx)
        return await self._http(request, ctx)

    def end_streams(self, within: float) -> list[asyncio.Future[None]]:
        """Stopping: every WebSocket stream ends with 1001 "going away", each side given `within` seconds to
        answer; futures done once they have."""
        return self._websocket.end_streams("shutdown", within)

    def end_rerouted_streams(self, successor: Gateway) -> None:
        """After a reload: a WebSocket stream whose route the new config changed in a way that matters to a
        stream, or removed, ends with 1001, so that no stream goes on under settings no longer configured;
        the others go on undisturbed."""
        self._websocket.end_streams(
            "reload",
            CLOSE_REPLY_TIMEOUT,
            keep=lambda route, target: successor.streams_as_before(route, target, self.config),
        )

    def streams_as_before(self, route: Route, target: str, config: GatewayConfig) -> bool:
        """Whether a stream of `route` to `target` (of an older generation, built from `config`) would be
        relayed by this one as it is: same path, authentication, message limit and upstream (for a pool:
        the target still in it). HTTP-only settings (body limits, timeouts, retries, rate limits, which an
        open stream no longer meets) do not count."""
        now = self._routes.get(route.name)
        if now is None or _stream_settings(now) != _stream_settings(route):
            return False
        return route.pool is None or target in _pool_targets(self.config, route.pool)

    async def close(self) -> None:
        """Stop for good, with the long-lived parts."""
        await self.health.stop()
        await self.resources.close()


def _stream_settings(route: Route) -> tuple[object, ...]:
    return (
        route.template,
        route.prefix,
        route.case_sensitive,
        route.websocket,
        route.rewrite,
        route.upstream,
        route.pool,
        route.preserve_host,
        route.auth,
        route.require,
        route.max_message_bytes,
    )


def _pool_targets(config: GatewayConfig, name: str) -> set[str]:
    pool = config.upstream_pools.get(name)
    return {target.url for target in pool.targets} if pool is not None else set()
