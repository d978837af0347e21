"""The admin listener (/healthz, /readyz, /metrics) and upstream reachability."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

import structlog
from aiohttp import hdrs, web
from yarl import URL

from gateway.observability import metrics

log = structlog.get_logger("gateway.health")


class RouteTargets(NamedTuple):
    pool: str | None
    """The route's upstream pool, or None for a route with one upstream URL."""
    urls: tuple[str, ...]


Ejected = Mapping[str, Collection[str]]
"""Pool name → the URLs of its targets that passive health keeps out now."""


class UpstreamHealth:
    """When each upstream target last answered. Real traffic counts; a TCP probe fills in when traffic is
    idle. The gateway is ready while every route has a target that answered lately and is not ejected."""

    def __init__(
        self,
        routes: Mapping[str, RouteTargets],
        *,
        probe_interval: float,
        max_age: float,
        ejected: Callable[[], Ejected] = dict,
    ) -> None:
        self._routes = routes
        self._ejected = ejected
        self._last_seen: dict[str, float] = dict.fromkeys(
            (url for targets in routes.values() for url in targets.urls), float("-inf")
        )
        self._probe_interval = probe_interval
        self._max_age = max_age
        self._task: asyncio.Task[None] | None = None

    # time.monotonic, not the loop's clock: this runs on every proxied request, and on Python 3.11 each
    # asyncio.get_running_loop() is a getpid() system call.
    def mark_reachable(self, upstream: str) -> None:
        self._last_seen[upstream] = time.monotonic()

    def inherit(self, previous: UpstreamHealth) -> None:
        """After a reload: what the previous generation saw of the upstreams both know, so /readyz does not
        flip to unreachable, nor probe again, because the config changed."""
        for upstream, seen in previous._last_seen.items():
            if upstream in self._last_seen:
                self._last_seen[upstream] = seen

    def unreachable(self) -> list[str]:
        now = time.monotonic()
        return [name for name, seen in self._last_seen.items() if now - seen > self._max_age]

    def readiness(self) -> tuple[list[str], Ejected, list[str]]:
        """The unreachable URLs, the ejected targets, and the routes left without a usable target."""
        unreachable = self.unreachable()
        ejected = self._ejected()
        return unreachable, ejected, routes_without_target(self._routes, unreachable, ejected)

    def start(self) -> None:
        self._task = asyncio.create_task(self._probe_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _probe_forever(self) -> None:
        while True:
            now = time.monotonic()
            stale = [u for u, seen in self._last_seen.items() if now - seen >= self._probe_interval]
            await asyncio.gather(*(self._probe(u) for u in stale))
            await asyncio.sleep(self._probe_interval)

    async def _probe(self, upstream: str) -> None:
        url = URL(upstream)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            async with asyncio.timeout(min(self._probe_interval, 5.0)):
                _, writer = await asyncio.open_connection(url.host, port)
        except (OSError, TimeoutError) as exc:
            log.info("upstream_probe_failed", upstream=upstream, error=type(exc).__name__)
            return
        writer.close()
        self.mark_reachable(upstream)


def routes_without_target(
    routes: Mapping[str, RouteTargets], unreachable: Collection[str], ejected: Ejected
) -> list[str]:
    """The routes every target of which is unreachable or ejected (from the route's own pool)."""
    down = set(unreachable)
    return [
        name
        for name, (pool, urls) in routes.items()
        if all(url in down or (pool is not None and url in ejected.get(pool, ())) for url in urls)
    ]


def upstream_check(unreachable: Collection[str], ejected: Ejected) -> str:
    """/readyz's `upstream` check: "ok", or which targets are unreachable and which ejected."""
    parts = ["unreachable: " + ", ".join(unreachable)] if unreachable else []
    parts += [f"ejected from pool {pool}: " + ", ".join(urls) for pool, urls in ejected.items() if urls]
    return "; ".join(parts) or "ok"


def admin_app(
    health: Callable[[], UpstreamHealth],
    is_draining: Callable[[], bool],
    redis_up: Callable[[], bool | None],
    server_header: Callable[[], str],
) -> web.Application:
    """Each argument asks the current generation, which a reload replaces; `redis_up` answers None when no
    Redis is configured."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks: dict[str, str] = {"config": "ok"}
        unreachable, ejected, stranded = health().readiness()
        checks["upstream"] = upstream_check(unreachable, ejected)
        if stranded:  # only these fail readiness: a pool with a target left still serves (degraded)
            checks["routes"] = "no usable upstream target: " + ", ".join(stranded)
        if is_draining():
            checks["server"] = "draining"
        redis = redis_up()
        if redis is not None:
            # Informational: shared limits fall back to each policy's on_redis_error, so the gateway still
            # serves, and failing readiness would take every instance out of the load balancer at once.
            checks["redis"] = "ok" if redis else "unavailable (rate limits use on_redis_error)"
        ready = not stranded and not is_draining()
        status = "not_ready" if not ready else "ready" if checks["upstream"] == "ok" else "degraded"
        return web.json_response({"status": status, "checks": checks}, status=200 if ready else 503)

    async def metrics_endpoint(request: web.Request) -> web.Response:
        # In a thread: a scrape of every known series takes long enough to hold up requests on the loop.
        body, content_type = await asyncio.to_thread(metrics.scrape, request.headers.get(hdrs.ACCEPT))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def name_server(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[hdrs.SERVER] = server_header()

    app = web.Application()
    app.on_response_prepare.append(name_server)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
