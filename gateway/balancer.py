"""Choosing a target of an upstream pool for each attempt, and passive health: which targets are out.

Pure: no I/O, no event loop; time comes from an injectable clock, so tests drive ejections with a fake one.

- Selection is nginx's smooth weighted round-robin: each pick adds every candidate's weight to its running
  score, takes the highest and subtracts the candidates' total from it. Over any run of sum(weights) picks
  each target is taken exactly `weight` times, interleaved (5:1:1 gives a a b a c a a, not a a a a a b c).
  `least_request` first keeps the candidates with the fewest requests in flight per unit of weight (nginx's
  least_conn: a weight-3 target takes three in flight for each one of a weight-1 target) and breaks the tie
  the same way, so idle targets share by weight.
- Passive health, as nginx's max_fails: `failures` consecutive connect failures or timeouts eject a target
  for `ejection` seconds. Its count is not reset by the ejection, so once the period is over a single
  further failure ejects it again (no slow start: every attempt picked for it until then meets it), and
  each ejection in a row lasts twice the one before, up to `max_ejection`. A response resets both.
  Failures and responses of attempts picked before a target's latest ejection are ignored: they tell of
  the target before it was ejected (a 60 s response timeout outlives a 30 s ejection).
- A pool of one target never ejects it: there is nothing to fail over to, and its failures keep answering
  502/504 as a route's single upstream does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    failures: int
    """Consecutive connect failures or timeouts that eject a target."""
    ejection: float
    """Seconds of a first ejection; each one after it, without a response in between, lasts twice as long."""
    max_ejection: float
    """The longest an ejection lasts."""

    def duration(self, previous: int) -> float:
        """Seconds of an ejection that follows `previous` ones in a row."""
        # The exponent is capped: past the cap the doubling no longer matters, and 2.0**n overflows.
        return min(self.ejection * 2.0 ** min(previous, 64), self.max_ejection)


class Target:
    """One target of a pool and its bookkeeping; the balancer's to change."""

    __slots__ = ("ejected_until", "ejections", "epoch", "failures", "in_flight", "score", "url", "weight")

    def __init__(self, url: str, weight: int) -> None:
        self.url = url
        self.weight = weight
        self.score = 0
        """Smooth weighted round-robin's running score (nginx's current_weight)."""
        self.in_flight = 0
        """Requests picked for this target whose response is not done yet."""
        self.failures = 0
        """Consecutive connect failures and timeouts since its last response."""
        self.ejections = 0
        """Ejections in a row since its last response: the next one lasts 2**ejections times as long."""
        self.ejected_until = float("-inf")
        """Clock time until which it is out of rotation."""
        self.epoch = 0
        """Ejections so far, ever: an attempt notes it when it picks the target, to be told apart from
        attempts picked after the target's latest ejection."""

    def __repr__(self) -> str:
        return f"Target({self.url!r}, weight={self.weight})"


class Balancer:
    """The targets of one pool: which one an attempt goes to, and which are ejected."""

    __slots__ = ("_clock", "_least_request", "_policy", "_single", "targets")

    def __init__(
        self,
        targets: Sequence[tuple[str, int]],
        policy: EjectionPolicy,
        *,
        least_request: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not targets:
            raise ValueError("a pool needs at least one target")
        self.targets = tuple(Target(url, weight) for url, weight in targets)
        self._policy = policy
        self._least_request = least_request
        self._clock = clock
        self._single = len(self.targets) == 1

    def pick(self, tried: Collection[Target] = ()) -> Target | None:
        """The target for the next attempt, counted in flight until `release`: one not in `tried` when any
        is usable, else a tried one that still is; None when every target is ejected."""
        if self._single:
            target = self.targets[0]
        else:
            now = self._clock()
            target = self._choose(now, tried) or (self._choose(now, ()) if tried else None)
            if target is None:
                return None
        target.in_flight += 1
        return target

    def _choose(self, now: float, tried: Collection[Target]) -> Target | None:
        candidates = [t for t in self.targets if t.ejected_until <= now and t not in tried]
        if not candidates:
            return None
        if self._least_request:
            # in_flight / weight compared as cross products: exact, no floats.
            least = min(candidates, key=lambda t: t.in_flight / t.weight)
            candidates = [t for t in candidates if t.in_flight * least.weight == least.in_flight * t.weight]
        best = candidates[0]
        total = 0
        for target in candidates:
            target.score += target.weight
            total += target.weight
            if target.score > best.score:
                best = target
        best.score -= total
        return best

    def release(self, target: Target) -> None:
        """The attempt `pick` returned `target` for is over (its response done, or it failed)."""
        target.in_flight -= 1

    def answered(self, target: Target, epoch: int) -> None:
        """The target answered (any status) an attempt that picked it at `epoch` (its epoch then): its
        failure count and back-off start again. An ejection under way runs its course all the same, and an
        answer to an attempt picked before the latest ejection changes nothing."""
        if epoch != target.epoch:
            return
        target.failures = 0
        target.ejections = 0

    def failed(self, target: Target, epoch: int) -> float | None:
        """A connect failure or timeout of an attempt that picked `target` at `epoch`; the seconds it is now
        ejected for, when this ejected it. Failures of attempts picked before its latest ejection (under way
        when it was ejected, however late they fail) do not eject it again."""
        # An attempt with the current epoch picked the target after its latest ejection ended (an ejected
        # target is not picked), so the target is not ejected now.
        if self._single or epoch != target.epoch:
            return None
        now = self._clock()
        target.failures += 1
        if target.failures < self._policy.failures:
            return None
        seconds = self._policy.duration(target.ejections)
        target.ejections += 1
        target.epoch += 1
        target.ejected_until = now + seconds
        return seconds

    def is_ejected(self, target: Target) -> bool:
        return target.ejected_until > self._clock()

    def ejected(self) -> list[Target]:
        """The targets out of rotation now."""
        now = self._clock()
        return [t for t in self.targets if t.ejected_until > now]

    def next_return(self) -> float:
        """Seconds until some target is back in rotation: 0 while one is in it."""
        now = self._clock()
        return max(0.0, min(t.ejected_until for t in self.targets) - now)
