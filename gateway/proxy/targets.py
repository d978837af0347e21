"""Upstream pools at run time: each pool's balancer (gateway/balancer.py) with its per-target metrics and
ejection logs, and one request's attempts over a pool.

A TargetPool lives as long as its pool's settings (gateway/resources.py: a reload that leaves a pool alone
keeps its ejections and in-flight counts); UpstreamTargets, the routes' view of them, is built per config.
Routes with one upstream URL never come here: their requests cost what they did before pools existed.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from gateway.balancer import Balancer, EjectionPolicy, Target
from gateway.config import UpstreamPoolConfig
from gateway.envelope import ErrorInfo, gateway_error
from gateway.health import RouteTargets
from gateway.observability import metrics
from gateway.proxy.upstream import UpstreamFailure, classify
from gateway.routing import Route

log = structlog.get_logger("gateway.pools")

COUNTED = frozenset({"connect", "timeout"})
"""Failures that count against a target: it could not be reached, or did not answer in time. A reset or a
broken response may be one request's doing (or a stale pooled connection's), so it does not."""


# Which TargetPool writes each (pool, target) series of the ejected gauge: the one built last. A reload that
# rebuilds a pool leaves the old one alive while its requests (an event stream, for hours) finish, and its
# timers and close() must not overwrite the new pool's state.
_GAUGE_OWNERS: weakref.WeakValueDictionary[tuple[str, str], TargetPool] = weakref.WeakValueDictionary()


class NoTarget(Exception):
    """No target of the pool is usable for the next attempt: each is ejected."""


class TargetPool:
    """One pool: its balancer, and what its targets' failures and ejections show in metrics and logs."""

    def __init__(
        self, name: str, config: UpstreamPoolConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        health = config.passive_health
        self.balancer = Balancer(
            [(target.url, target.weight) for target in config.targets],
            EjectionPolicy(health.failures, health.ejection, health.max_ejection),
            least_request=config.balance == "least_request",
            clock=clock,
        )
        self._clock = clock
        targets = self.balancer.targets
        # Made now, so every target's series exist (at 0) before its first request.
        self.requests = {t: metrics.TARGET_REQUESTS.labels(name, t.url) for t in targets}
        self._ejections = {t: metrics.TARGET_EJECTIONS.labels(name, t.url) for t in targets}
        self._ejected = {t: metrics.TARGET_EJECTED.labels(name, t.url) for t in targets}
        for target, gauge in self._ejected.items():
            _GAUGE_OWNERS[name, target.url] = self
            gauge.set(0)
        self._failures: dict[tuple[Target, str], Any] = {}
        self._returns: dict[Target, asyncio.TimerHandle] = {}

    def failed(self, target: Target, kind: str, epoch: int) -> None:
        """An attempt that picked `target` at `epoch` got no response (`kind` as classify() names it)."""
        child = self._failures.get((target, kind))
        if child is None:
            child = self._failures[target, kind] = metrics.TARGET_FAILURES.labels(self.name, target.url, kind)
        child.inc()
        if kind not in COUNTED:
            return
        seconds = self.balancer.failed(target, epoch)
        if seconds is None:
            return
        self._ejections[target].inc()
        self._set_ejected(target, 1)
        log.warning(
            "upstream_target_ejected",
            pool=self.name,
            upstream_target=target.url,
            kind=kind,
            failures=target.failures,
            seconds=seconds,
        )
        self._return_in(target, seconds)

    def _return_in(self, target: Target, seconds: float) -> None:
        # The gauge and the log follow the ejection's end even when no request comes to notice it.
        pending = self._returns.get(target)
        if pending is not None:  # ejected again between its return by the clock and the loop's timer
            pending.cancel()
        self._returns[target] = asyncio.get_running_loop().call_later(seconds, self._returned, target)

    def _returned(self, target: Target) -> None:
        del self._returns[target]
        if self.balancer.is_ejected(target):  # the loop's timer ran ahead of the balancer's clock
            self._return_in(target, target.ejected_until - self._clock())
            return
        self._set_ejected(target, 0)
        log.info("upstream_target_returned", pool=self.name, upstream_target=target.url)

    def _set_ejected(self, target: Target, value: int) -> None:
        if _GAUGE_OWNERS.get((self.name, target.url)) is self:
            self._ejected[target].set(value)

    def unavailable(self) -> ErrorInfo:
        """The answer when every target is ejected, with Retry-After for when the first one is back."""
        return gateway_error(
            503,
            "SERVICE_UNAVAILABLE",
            "No upstream server can take the request now: each one failed just before. Retry later.",
            headers={"Retry-After": str(max(1, math.ceil(self.balancer.next_return())))},
        )

    async def close(self) -> None:
        """The pool left the config: no more ejection ends to follow, its ejections no longer count."""
        for target, timer in self._returns.items():
            timer.cancel()
            self._set_ejected(target, 0)
        self._returns.clear()


class Tries:
    """One request's attempts over a pool: each goes to a target not tried yet while one is usable, and
    holds it (in flight, for least_request) until it failed or its response is done."""

    __slots__ = ("_current", "_epoch", "_tried", "last_error", "pool")

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self._tried: list[Target] = []
        self._current: Target | None = None
        self._epoch = 0
        """The current target's epoch when it was picked (see Balancer.failed)."""
        self.last_error: BaseException | None = None
        """Why the last attempt failed; None while none has."""

    def next(self) -> str:
        """The URL of the target for the next attempt, or NoTarget."""
        target = self.pool.balancer.pick(self._tried)
        if target is None:
            raise NoTarget(self.pool.name)
        if target not in self._tried:
            self._tried.append(target)
        self._current = target
        self._epoch = target.epoch
        self.pool.requests[target].inc()
        return target.url

    def answered(self) -> None:
        """The current target answered: it stays held until done()."""
        assert self._current is not None
        self.pool.balancer.answered(self._current, self._epoch)

    def failed(self, error: BaseException) -> None:
        """The current attempt got no response, through the target's fault or perhaps not (see COUNTED);
        a failure of the gateway's own limits (its connection pool, its file descriptors) is no target's."""
        self.last_error = error
        target = self._release()
        failure = classify(error)
        if target is not None and not failure.local:
            self.pool.failed(target, failure.kind, self._epoch)

    def exhausted(self) -> UpstreamFailure:
        """Why the request fails when no target is left for it: its last attempt's failure, or, when every
        target was out before it tried any, `ejected` and a 503."""
        if self.last_error is not None:
            return classify(self.last_error)
        return UpstreamFailure("ejected", self.pool.unavailable())

    def done(self) -> None:
        """The request is over (its response done, abandoned, or failed for the client's reasons)."""
        self._release()

    def _release(self) -> Target | None:
        target, self._current = self._current, None
        if target is not None:
            self.pool.balancer.release(target)
        return target


class UpstreamTargets:
    """The pools the routes use, by name, and the URLs each route reaches (for /readyz)."""

    def __init__(self, pools: Mapping[str, TargetPool], routes: Sequence[Route]) -> None:
        used = sorted({route.pool for route in routes if route.pool is not None})
        self.pools = {name: pools[name] for name in used}
        self.route_targets = {route.name: self._reached(route) for route in routes}

    def _reached(self, route: Route) -> RouteTargets:
        if route.pool is None:
            return RouteTargets(None, (route.upstream,))
        return RouteTargets(route.pool, tuple(t.url for t in self.pools[route.pool].balancer.targets))

    def tries(self, pool: str) -> Tries:
        return Tries(self.pools[pool])

    def ejected(self) -> dict[str, list[str]]:
        """Pool name → the URLs of its targets out of rotation now (pools with none left out)."""
        out = {name: [t.url for t in pool.balancer.ejected()] for name, pool in self.pools.items()}
        return {name: urls for name, urls in out.items() if urls}
