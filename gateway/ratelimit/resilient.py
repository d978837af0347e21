"""Shared (Redis) limits that never make a request wait for Redis longer than a budget, and never fail it.

The budget (`rate_limit.redis_budget`, 250 ms by default) is Redis's, not the event loop's: a backend that
enforces it itself (`enforces_budget`, RedisBackend) measures it from the moment a check's command was
written to Redis to the moment its reply was read, with no per-request timer (see RedisBackend), so a busy
gateway whose loop queues checks, or a process descheduled while a reply waits in its socket, never sees a
Redis failure and never falls back while Redis answers in time. Rarer steps are bounded by the Redis
client's own timeouts (1 s, gateway.redis_client) instead: opening a connection, reloading the script after
NOSCRIPT, following a Cluster redirection. Any other backend runs under `asyncio.timeout(budget)`.
A check that runs out of budget or fails (any RedisError or OSError, which covers
the builtin ConnectionError and TimeoutError) falls back to each policy's `on_redis_error` mode:

- "open": admitted without counting (remaining = limit);
- "closed": an `Unavailable` decision, allowed=False: the caller answers 503, not 429 (see is_unavailable);
- "local" (the default): the same limit, keyed the same, counted by this process's MemoryBackend with its
  limit (and GCRA rate) divided by the number of gateway instances (see local_share).

A circuit breaker keeps an outage cheap: after `failure_threshold` consecutive failures Redis is not called
at all for `reset_after` seconds (no budget spent, every request falls back at once); then one trial call
at a time decides whether it closes again (back to Redis, by itself) or stays open for another period.
Requests arriving while the trial is in flight fall back without waiting for it. Since only Redis's own
time is charged, every failure is evidence against Redis.

A check that timed out may still be executed by Redis later (e.g. a paused server working through its
socket buffer), so an outage can count a request both locally and in Redis. With a healthy Redis no check
times out, so every decision is Redis's and shared limits stay exact.

All or nothing holds across modes: if a "closed" policy makes the request unavailable, the "local" ones are
evaluated without consuming anything, exactly as when a limit rejects.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import structlog
from redis.exceptions import RedisError

from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.types import Backend, Decision, Limit

log = structlog.get_logger("gateway.ratelimit")

OnRedisError = Literal["open", "closed", "local"]
BreakerState = Literal["closed", "open", "half_open"]
MODES: frozenset[str] = frozenset(("open", "closed", "local"))

# What counts as "Redis failed". Builtin TimeoutError (asyncio.timeout's) and ConnectionError are OSErrors;
# redis-py's own ConnectionError/TimeoutError/ResponseError/... are RedisErrors.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError)

FALLBACK_LOG_INTERVAL = 10.0

# Appended to the local check when a "closed" policy already made the request unavailable: it always
# rejects, so MemoryBackend evaluates the other limits (real decisions) and writes nothing (all or nothing).
_NEVER = Limit(policy="", key="gw:rl:resilient:never", algorithm="gcra", limit=0, rate=1.0)


@dataclass(slots=True)
class Unavailable(Decision):
    """A "closed" policy that could not be decided because Redis is unavailable: allowed=False with
    retry_after 0. Its enforced_reject is True like any rejection, so check is_unavailable() first."""


def is_unavailable(decision: Decision) -> bool:
    """This decision blocks the request because the shared store is unavailable (answer 503, not 429).
    A shadow policy never blocks, so a shadow Unavailable is not."""
    return isinstance(decision, Unavailable) and not decision.shadow


def is_limited(decision: Decision) -> bool:
    """This decision makes the request a 429: a limit refused it (an unavailable one makes it a 503)."""
    return decision.enforced_reject and not is_unavailable(decision)


def local_share(limit: Limit, instances: int) -> Limit:
    """This instance's share of a shared limit: limit (and GCRA rate) divided by `instances`, same key.

    The limit is rounded up, so evenly spread traffic is never rejected more than by the shared limit (a
    burst across all instances may reach limit + instances - 1). A limit of 0 stays 0 (it blocks), any other
    stays at least 1, and at least `cost` when the shared one could admit a request of that cost at all.
    Team overrides are Redis hashes, so they do not apply here: `local` has none unless told.
    """
    if instances < 1:
        raise ValueError("instances must be >= 1")
    if instances == 1:
        return limit
    share = math.ceil(limit.limit / instances)
    if limit.limit >= limit.cost:
        share = max(share, limit.cost)
    rate = limit.rate / instances if limit.algorithm == "gcra" else limit.rate
    return replace(limit, limit=share, rate=rate)


class Permit(NamedTuple):
    """Leave to call Redis once; report the outcome to the breaker that issued it."""

    generation: int
    trial: bool


class CircuitBreaker:
    """Consecutive failures open it; after `reset_after` seconds one trial at a time may close it.

    Pure state machine on an injected clock. Outcomes of calls begun in an earlier state (a slow call that
    started before the breaker opened, say) are ignored: only current evidence moves it.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if not reset_after >= 0:
            raise ValueError("reset_after must be >= 0")
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self._clock = clock
        self._state: BreakerState = "closed"
        self._generation = 0
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0  # start of the current open period
        self._down_since = 0.0  # first opening of this outage
        self._trials = 0  # trials that failed during this outage
        self._trial_out = False
        self._permit = Permit(self._generation, trial=False)  # what every call gets while closed

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def begin(self) -> Permit | None:
        """A permit to call Redis now, or None: fall back without calling it."""
        if self._state == "closed":
            return self._permit
        if self._state == "open":
            if self._clock() - self._opened_at < self.reset_after:
                return None
            self._move("half_open")
        if self._trial_out:
            return None
        self._trial_out = True
        return Permit(self._generation, trial=True)

    def succeeded(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return
        if permit.trial:
            log.info(
                "redis_breaker_closed",
                down_for=round(self._clock() - self._down_since, 3),
                failed_trials=self._trials,
            )
            self._move("closed")
        else:
            self._failures = 0

    def failed(self, permit: Permit, error: str = "") -> None:
        if permit.generation != self._generation:
            return
        if permit.trial:
            self._trials += 1
            log.debug("redis_breaker_trial_failed", error=error, failed_trials=self._trials)
            self._move("open")
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            log.warning(
                "redis_breaker_open", failures=self._failures, error=error, reset_after=self.reset_after
            )
            self._down_since = self._clock()
            self._trials = 0
            self._move("open")

    def abandoned(self, permit: Permit) -> None:
        """The call ended with no verdict on Redis (the request itself was cancelled, a caller bug):
        a trial's slot goes to the next request instead of wedging the breaker half-open."""
        if permit.generation == self._generation and permit.trial:
            self._trial_out = False

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._permit = Permit(self._generation, trial=False)
        self._failures = 0
        self._trial_out = False
        if state == "open":
            self._opened_at = self._clock()


class LogSampler:
    """At most one log line per key per `interval` seconds; the next one carries how many were skipped."""

    def __init__(self, interval: float = FALLBACK_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None: stay quiet. Otherwise log now, reporting this many suppressed since the last line."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class ResilientBackend:
    """Shared (Redis) limits that never make a request wait longer than the budget, and never fail it."""

    def __init__(
        self,
        shared: Backend,
        local: MemoryBackend,
        *,
        budget: float = 0.05,
        failure_threshold: int = 5,
        reset_after: float = 5.0,
        instances: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_fallback: Callable[[str, str], None] | None = None,
        on_redis_call: Callable[[float, bool], None] | None = None,
    ) -> None:
        """`on_fallback(policy, mode)` is called once per limit decided without Redis (a metrics hook; it
        must not raise). `on_redis_call(seconds, failed)` once per call to Redis. `clock` drives the
        breaker and log sampling; `local` keeps its own clock."""
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError("budget must be a finite number > 0")
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self._shared = shared
        self._local = local
        self.budget = budget
        self.instances = instances
        self.breaker = CircuitBreaker(failure_threshold, reset_after, clock)
        self._sampler = LogSampler(FALLBACK_LOG_INTERVAL, clock)
        self._on_fallback = on_fallback
        self._on_redis_call = on_redis_call
        self._enforces_budget = bool(getattr(shared, "enforces_budget", False))
        self._valid_modes: tuple[str, ...] = ()  # the last modes found valid (callers pass the same tuple)

    @property
    def redis_up(self) -> bool:
        """The breaker is closed: shared checks go to Redis."""
        return self.breaker.closed

    async def check(
        self, limits: Sequence[Limit], modes: Sequence[OnRedisError]
    ) -> tuple[list[Decision], bool]:
        """(one Decision per Limit in order, fell_back): fell_back is True when Redis did not decide."""
        if len(modes) != len(limits):
            raise ValueError(f"{len(limits)} limits but {len(modes)} modes")
        if modes is not self._valid_modes:
            if not MODES.issuperset(modes):
                raise ValueError(f"unknown on_redis_error mode in {list(modes)!r}")
            if type(modes) is tuple:  # immutable: found valid once, valid for good
                self._valid_modes = modes
        if not limits:
            return [], False
        permit = self.breaker.begin()
        if permit is None:
            return self._fallback(limits, modes, "breaker_open"), True
        started = time.perf_counter()
        try:
            if self._enforces_budget:
                decisions = await self._shared.check(limits, budget=self.budget)  # type: ignore[call-arg]
            else:
                async with asyncio.timeout(self.budget):
                    decisions = await self._shared.check(limits)
        except REDIS_FAILURES as exc:
            error = type(exc).__name__
            self.breaker.failed(permit, error)
            self._observe(started, failed=True)
            return self._fallback(limits, modes, error), True
        except BaseException:
            self.breaker.abandoned(permit)
            raise
        self.breaker.succeeded(permit)
        if self._on_redis_call is not None:  # _observe, inline on the hot path
            self._on_redis_call(time.perf_counter() - started, False)
        return decisions, False

    def _observe(self, started: float, *, failed: bool) -> None:
        if self._on_redis_call is not None:
            self._on_redis_call(time.perf_counter() - started, failed)

    async def close(self) -> None:
        """Closes both backends (RedisBackend leaves its client to its owner)."""
        await self._shared.close()
        await self._local.close()

    def _fallback(self, limits: Sequence[Limit], modes: Sequence[str], reason: str) -> list[Decision]:
        decisions: list[Decision | None] = [None] * len(limits)
        local: list[int] = []
        for i, (lim, mode) in enumerate(zip(limits, modes, strict=True)):
            if mode == "local":
                local.append(i)
            elif mode == "open":
                decisions[i] = Decision(lim.policy, True, lim.shadow, lim.limit, lim.limit, 0.0, 0.0)
            else:  # "closed"
                decisions[i] = Unavailable(lim.policy, False, lim.shadow, lim.limit, 0, 0.0, 0.0)
        if local:
            shares = [local_share(limits[i], self.instances) for i in local]
            if any(is_unavailable(d) for d in decisions if d is not None):
                shares.append(_NEVER)  # the request is rejected anyway: consume nothing
            for i, decision in zip(local, self._local.check_sync(shares), strict=False):
                decisions[i] = decision
        for lim, mode in zip(limits, modes, strict=True):
            self._report(lim.policy, mode, reason)
        return [d for d in decisions if d is not None]

    def _report(self, policy: str, mode: str, reason: str) -> None:
        if self._on_fallback is not None:
            self._on_fallback(policy, mode)
        suppressed = self._sampler.admit(policy)
        if suppressed is not None:
            log.warning("ratelimit_fallback", policy=policy, mode=mode, reason=reason, suppressed=suppressed)
