"""The in-process backend: per-instance limits (client IP tiers) and a fallback when Redis is down.

Same semantics as RedisBackend (both run gateway.ratelimit.algorithms.evaluate). Memory is bounded: entries
vanish when they expire (like the Redis keys), a periodic sweep drops expired ones nobody asks for again,
and past `max_keys` the least recently used entry is forgotten (which can only admit more, never fewer).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from gateway.ratelimit.algorithms import effective, evaluate
from gateway.ratelimit.types import Decision, Limit

SWEEP_INTERVAL = 60.0


class MemoryBackend:
    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._clock = clock
        self._max_keys = max_keys
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (state, expires_at)
        self._overrides: dict[str, dict[str, str]] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL

    def __len__(self) -> int:
        return len(self._entries)

    def set_override(self, override_key: str, field: str, value: str | float | None) -> None:
        """HSET (or HDEL when value is None) on the in-memory override hashes."""
        fields = self._overrides.setdefault(override_key, {})
        if value is None:
            fields.pop(field, None)
        else:
            fields[field] = str(value)

    async def check(self, limits: Sequence[Limit]) -> list[Decision]:
        return self.check_sync(limits)

    def check_sync(self, limits: Sequence[Limit]) -> list[Decision]:
        """check() without the coroutine: nothing here waits, so it is atomic within the event loop."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)

        def read(key: str) -> float | None:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[0]

        decisions, writes = evaluate(limits, now, read, self._read_override)
        for write in writes:
            self._entries[write.key] = (write.value, write.expires_at)
            self._entries.move_to_end(write.key)
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)
        return decisions

    def now(self) -> float:
        return self._clock()

    def refund(self, grants: Sequence[tuple[Limit, Decision]], checked_at: float) -> None:
        """Give back what checks admitted at `checked_at` still hold (the request was then rejected
        elsewhere). A GCRA grant drains away with time, so only its undrained part goes back: by now the
        bucket may have emptied and filled again with other requests, whose counts must stay."""
        now = self._clock()
        for lim, decision in grants:
            key = lim.storage_key
            entry = self._entries.get(key)
            if entry is None:
                continue
            state, expires_at = entry
            if lim.algorithm == "gcra":
                _, rate = effective(lim, self._read_override)
                granted = lim.cost * lim.period / rate
                # The grant was the last `granted` seconds of the backlog that ended at this instant.
                ended = checked_at + decision.reset_after
                state -= min(granted, max(ended - now, 0.0))
            else:  # one counter per window: a grant from an earlier window touches a key no longer in use
                state = max(0.0, state - lim.cost)
            self._entries[key] = (state, expires_at)

    async def close(self) -> None:
        self._entries.clear()

    def _read_override(self, override_key: str, field: str) -> str | None:
        return self._overrides.get(override_key, {}).get(field)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL
        for key in [k for k, (_, expires_at) in self._entries.items() if expires_at <= now]:
            del self._entries[key]
