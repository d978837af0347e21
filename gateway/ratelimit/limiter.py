"""One request's rate-limit check: per-instance policies in memory, shared ones in Redis (through the
resilient wrapper), all or nothing across both: a request the shared check rejects gets its local
consumption refunded, and one the local check rejects never reaches Redis. A request checked in two stages
(before and after authentication) that the second refuses gets the first one's refunded too (refund)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.policies import Caller, Policy
from gateway.ratelimit.resilient import is_limited, is_unavailable
from gateway.ratelimit.types import Decision, Limit


class SharedBackend(Protocol):
    async def check(self, limits: Sequence[Limit], modes: Sequence[str]) -> tuple[list[Decision], bool]: ...

    async def close(self) -> None: ...


RequestVerdict = Literal["allowed", "limited", "shadow_limited", "unavailable"]
# Most telling first: what a log line reports for a request that several policies judged.
_SEVERITY: dict[RequestVerdict, int] = {"limited": 3, "unavailable": 2, "shadow_limited": 1, "allowed": 0}


@dataclass(frozen=True, slots=True)
class Checked:
    policy: Policy
    limit: Limit
    decision: Decision

    @property
    def verdict(self) -> RequestVerdict:
        """unavailable: a `closed` policy Redis could not decide (503, and counted as a fallback)."""
        decision = self.decision
        if is_unavailable(decision):
            return "unavailable"
        if is_limited(decision):
            return "limited"
        return "allowed" if decision.allowed else "shadow_limited"


@dataclass(frozen=True, slots=True)
class Outcome:
    checked: tuple[Checked, ...]
    fell_back: bool
    """Some shared policy was decided without Redis (its on_redis_error mode applied)."""
    local_at: float = 0.0
    """When this process's policies were checked, on its MemoryBackend's clock (what a refund needs)."""

    @property
    def blocking(self) -> list[Checked]:
        return [c for c in self.checked if c.decision.enforced_reject]

    def worst(self) -> Checked:
        """The policy that speaks for the request in its log line: one that rejected it, else one that
        could not decide, else one that would have rejected it (shadow), else the first."""
        return max(self.checked, key=lambda c: _SEVERITY[c.verdict])


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
        local = [pair for pair in applicable if self._counted_here(pair[0])]
        shared = [pair for pair in applicable if not self._counted_here(pair[0])]

        checked: list[Checked] = []
        local_at = self._local.now()  # read first: a refund may then give back a little less, never more
        if local:
            decisions = self._local.check_sync([limit for _, limit in local])
            checked += [Checked(p, lim, d) for (p, lim), d in zip(local, decisions, strict=True)]
            if any(d.enforced_reject for d in decisions):
                return Outcome(tuple(checked), fell_back=False, local_at=local_at)
        fell_back = False
        if shared:
            assert self._shared is not None
            decisions, fell_back = await self._shared.check(
                [limit for _, limit in shared], [p.config.on_redis_error for p, _ in shared]
            )
            if any(d.enforced_reject for d in decisions):
                self._refund(checked, local_at)  # so far only the local ones
            checked += [Checked(p, lim, d) for (p, lim), d in zip(shared, decisions, strict=True)]
        return Outcome(tuple(checked), fell_back, local_at)

    def refund(self, outcome: Outcome) -> None:
        """Give back what an admitted check consumed: a later stage refused the request after all.

        Only this process's counts can be given back, and only they need to be: routing checks shared
        policies before authentication only on routes without identity policies, i.e. with no later stage
        that could refuse (a test in tests/test_ratelimit_gateway.py holds that invariant)."""
        self._refund(outcome.checked, outcome.local_at)

    def _refund(self, checked: Sequence[Checked], local_at: float) -> None:
        # A policy that did not admit (a shadow one that would have rejected) consumed nothing.
        held = [c for c in checked if c.decision.allowed and self._counted_here(c.policy)]
        self._local.refund([(c.limit, c.decision) for c in held], local_at)

    def _counted_here(self, policy: Policy) -> bool:
        """In this process's memory: every policy when there is no Redis, else the `local` ones."""
        return self._shared is None or policy.config.scope == "local"

    async def close(self) -> None:
        await self._local.close()
        if self._shared is not None:
            await self._shared.close()
