"""One request's rate-limit check: per-instance policies in memory, shared ones in Redis (through the
resilient wrapper), all or nothing across both: a request the shared check rejects gets its local
consumption refunded, and one the local check rejects never reaches Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.policies import Caller, Policy
from gateway.ratelimit.types import Decision, Limit


class SharedBackend(Protocol):
    async def check(self, limits: Sequence[Limit], modes: Sequence[str]) -> tuple[list[Decision], bool]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Checked:
    policy: Policy
    limit: Limit
    decision: Decision


@dataclass(frozen=True, slots=True)
class Outcome:
    checked: tuple[Checked, ...]
    fell_back: bool
    """Some shared policy was decided without Redis (its on_redis_error mode applied)."""

    @property
    def blocking(self) -> list[Checked]:
        return [c for c in self.checked if c.decision.enforced_reject]


class RateLimiter:
    def __init__(
        self,
        policies: Mapping[str, Policy],
        *,
        local: MemoryBackend,
        shared: SharedBackend | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policies = policies
        self._local = local
        self._shared = shared
        self._clock = clock

    async def check(self, policy_names: Sequence[str], caller: Caller, cost: int) -> Outcome | None:
        now = self._clock()
        applicable = [
            (policy, limit)
            for policy in (self._policies[name] for name in policy_names)
            if (limit := policy.limit_for(caller, now, cost)) is not None
        ]
        if not applicable:
            return None
        if self._shared is None:  # no Redis: every policy is counted in this process
            local, shared = applicable, []
        else:
            local = [pair for pair in applicable if pair[0].config.scope == "local"]
            shared = [pair for pair in applicable if pair[0].config.scope == "shared"]

        checked: list[Checked] = []
        local_limits = [limit for _, limit in local]
        if local:
            decisions = self._local.check_sync(local_limits)
            checked += [Checked(p, lim, d) for (p, lim), d in zip(local, decisions, strict=True)]
            if any(d.enforced_reject for d in decisions):
                return Outcome(tuple(checked), fell_back=False)
        fell_back = False
        if shared:
            assert self._shared is not None
            decisions, fell_back = await self._shared.check(
                [limit for _, limit in shared], [p.config.on_redis_error for p, _ in shared]
            )
            checked += [Checked(p, lim, d) for (p, lim), d in zip(shared, decisions, strict=True)]
            if local and any(d.enforced_reject for d in decisions):
                self._local.refund(local_limits)
        return Outcome(tuple(checked), fell_back)

    async def close(self) -> None:
        await self._local.close()
        if self._shared is not None:
            await self._shared.close()
