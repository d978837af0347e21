"""The admin listener (/healthz, /readyz, /metrics) and upstream reachability."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

import structlog
from aiohttp import hdrs, web
from yarl import URL

from gateway.observability import metrics

log = structlog.get_logger("gateway.health")


class UpstreamHealth:
    """When each upstream last answered. Real traffic counts; a TCP probe fills in when traffic is idle."""

    def __init__(self, upstreams: Iterable[str], *, probe_interval: float, max_age: float) -> None:
        self._last_seen: dict[str, float] = dict.fromkeys(upstreams, float("-inf"))
        self._probe_interval = probe_interval
        self._max_age = max_age
        self._task: asyncio.Task[None] | None = None

    # time.monotonic, not the loop's clock: this runs on every proxied request, and on Python 3.11 each
    # asyncio.get_running_loop() is a getpid() system call.
    def mark_reachable(self, upstream: str) -> None:
        self._last_seen[upstream] = time.monotonic()

    def unreachable(self) -> list[str]:
        now = time.monotonic()
        return [name for name, seen in self._last_seen.items() if now - seen > self._max_age]

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


def admin_app(
    health: UpstreamHealth,
    is_draining: Callable[[], bool],
    redis_up: Callable[[], bool] | None,
    server_header: str,
) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks: dict[str, str] = {"config": "ok"}
        unreachable = health.unreachable()
        checks["upstream"] = "ok" if not unreachable else "unreachable: " + ", ".join(unreachable)
        if is_draining():
            checks["server"] = "draining"
        if redis_up is not None:
            # Informational: shared limits fall back to each policy's on_redis_error, so the gateway still
            # serves, and failing readiness would take every instance out of the load balancer at once.
            checks["redis"] = "ok" if redis_up() else "unavailable (rate limits use on_redis_error)"
        ready = not unreachable and not is_draining()
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "checks": checks}, status=200 if ready else 503
        )

    async def metrics_endpoint(request: web.Request) -> web.Response:
        body, content_type = metrics.scrape()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def name_server(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[hdrs.SERVER] = server_header

    app = web.Application()
    app.on_response_prepare.append(name_server)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
