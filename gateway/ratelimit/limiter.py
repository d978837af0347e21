"""One request's rate-limit check: per-instance policies in memory, shared ones in Redis (through the
resilient wrapper), all or nothing across both: a request the shared check rejects gets its local
consumption refunded, and one the local check rejects never reaches Redis. A request checked in two stages
(before and after authentication) that the second refuses gets the first one's refunded too (refund)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

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


class Checked:
    """One policy's part in a request's check. Built per policy per request, so a plain slotted class (a
    frozen dataclass's __init__ costs several times as much): treat it as immutable."""

    __slots__ = ("decision", "limit", "policy", "verdict")

    verdict: RequestVerdict
    """unavailable: a `closed` policy Redis could not decide (503, and counted as a fallback). Worked out
    once: the metrics and the access log both read it."""

    def __init__(self, policy: Policy, limit: Limit, decision: Decision) -> None:
        self.policy = policy
        self.limit = limit
        self.decision = decision
        if decision.shadow:  # never blocks: neither unavailable nor limited
            self.verdict = "allowed" if decision.allowed else "shadow_limited"
        elif type(decision) is Decision:  # not Unavailable: limited when it does not admit
            self.verdict = "allowed" if decision.allowed else "limited"
        elif is_unavailable(decision):
            self.verdict = "unavailable"
        elif is_limited(decision):
            self.verdict = "limited"
        else:
            self.verdict = "allowed" if decision.allowed else "shadow_limited"

    def __repr__(self) -> str:
        return f"Checked(policy={self.policy.name!r}, limit={self.limit!r}, decision={self.decision!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Checked)
        return (self.policy, self.limit, self.decision) == (other.policy, other.limit, other.decision)

    __hash__ = None  # type: ignore[assignment]


@dataclass(slots=True)
class Outcome:
    """Not frozen, for speed (one or two per request); treat as immutable."""

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
        checked = self.checked
        worst = checked[0]
        if len(checked) == 1:
            return worst
        severity = _SEVERITY[worst.verdict]
        for c in checked:
            rank = _SEVERITY[c.verdict]
            if rank > severity:  # the first of the most severe, as max() picks
                worst, severity = c, rank
        return worst


class _Plan(NamedTuple):
    """What RateLimiter.check needs to know about one route's list of policies, worked out once."""

    policies: tuple[Policy, ...]
    where: Literal["local", "shared", "both"]
    """Where they are all counted: this process's memory, Redis, or some in each."""
    modes: tuple[str, ...]
    """Their on_redis_error modes, in order (what the shared check takes when all apply)."""


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
        self._plans: dict[tuple[str, ...], _Plan] = {}

    def _plan(self, policy_names: tuple[str, ...]) -> _Plan:
        plan = self._plans.get(policy_names)
        if plan is None:
            policies = tuple(self._policies[name] for name in policy_names)
            here = {self._counted_here(p) for p in policies}
            where: Literal["local", "shared", "both"] = (
                "both" if len(here) > 1 else "local" if True in here else "shared"
            )
            plan = _Plan(policies, where, tuple(p.config.on_redis_error for p in policies))
            if len(self._plans) >= 1024:  # routes name a handful of lists; anything else is a caller's own
                self._plans.clear()
            self._plans[policy_names] = plan
        return plan

    async def check(self, policy_names: Sequence[str], caller: Caller, cost: int) -> Outcome | None:
        plan = self._plan(policy_names if type(policy_names) is tuple else tuple(policy_names))
        now = self._clock()
        if plan.where == "both":
            return await self._check_both(plan, caller, now, cost)
        # All counted here or all in Redis (the common case): one backend decides them all at once, so
        # there is nothing to split, and nothing to refund when it rejects. Inline: a coroutine less.
        policies = plan.policies
        limits = [policy.limit_for(caller, now, cost) for policy in policies]
        modes: Sequence[str] = plan.modes
        for limit in limits:
            if limit is None:  # some do not apply to this caller
                policies = tuple(p for p, lim in zip(policies, limits, strict=True) if lim is not None)
                if not policies:
                    return None
                modes = tuple(p.config.on_redis_error for p in policies)
                limits = [lim for lim in limits if lim is not None]
                break
        applied: list[Limit] = limits  # type: ignore[assignment]  # no None left
        local_at = self._local.now()  # read first: a refund may then give back a little less, never more
        fell_back = False
        if plan.where == "local":
            decisions = self._local.check_sync(applied)
        else:
            assert self._shared is not None
            decisions, fell_back = await self._shared.check(applied, modes)
        checked = tuple([Checked(p, lim, d) for p, lim, d in zip(policies, applied, decisions, strict=True)])
        return Outcome(checked, fell_back, local_at)

    async def _check_both(self, plan: _Plan, caller: Caller, now: float, cost: int) -> Outcome | None:
        """check() when some policies are counted here and some in Redis: this process's first, and Redis
        only when they admit; a rejection by Redis refunds what this process's counted."""
        applicable = [
            (policy, limit)
            for policy in plan.policies
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
