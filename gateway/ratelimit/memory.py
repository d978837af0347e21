"""The in-process backend: per-instance limits (client IP tiers) and a fallback when Redis is down.

Same semantics as RedisBackend (both run gateway.ratelimit.algorithms.evaluate). Memory is bounded by
`max_keys`:

- an entry goes when it expires, like the Redis key would: a GCRA bucket once it is full again, a quota
  counter after its window's grace. Expiry is driven by a heap of due times, checked on every call (and by
  `expire()`, which the gateway also runs once a second), so a table holds only buckets still in use;
- a full table forgets its least recently used entry. That client starts again from a full bucket: eviction
  can only admit more, never fewer, and `evictions` counts it happening.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from gateway.ratelimit.algorithms import effective, evaluate
from gateway.ratelimit.types import Decision, Limit

DEFAULT_MAX_KEYS = 100_000
# The due-time heap may hold items of keys already gone (evicted, or re-added since); past this many items
# per live entry it is rebuilt from the table, which keeps it O(table) at an amortised O(1) per eviction.
_HEAP_SLACK = 1.5
_HEAP_FLOOR = 1024


class MemoryBackend:
    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._clock = clock
        self.max_keys = max_keys
        self.evictions = 0
        """Entries forgotten because the table was full (a counter, never reset)."""
        # key -> (state, expires_at), least recently used first.
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()
        # (due, key): at least one item per entry, due when it expires. An entry's expiry only moves later (a
        # GCRA write extends the backlog, a quota window's end is fixed; at most Redis's millisecond rounding
        # earlier), so a write pushes nothing: an item that comes due early moves to the entry's expiry.
        self._due: list[tuple[float, str]] = []
        self._overrides: dict[str, dict[str, str]] = {}

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
        self._expire(now)
        entries = self._entries

        def read(key: str) -> float | None:
            entry = entries.get(key)
            if entry is None:
                return None
            entries.move_to_end(key)
            return entry[0]

        decisions, writes = evaluate(limits, now, read, self._read_override)
        for write in writes:
            if write.key not in entries:
                heapq.heappush(self._due, (write.expires_at, write.key))
            entries[write.key] = (write.value, write.expires_at)
            entries.move_to_end(write.key)
        if len(entries) > self.max_keys:
            self._evict()
        return decisions

    def expire(self) -> None:
        """Drop every entry that has expired by now (check() does this too; an idle gateway calls this)."""
        self._expire(self._clock())

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
        self._due.clear()

    def _read_override(self, override_key: str, field: str) -> str | None:
        return self._overrides.get(override_key, {}).get(field)

    def _expire(self, now: float) -> None:
        due, entries = self._due, self._entries
        while due and due[0][0] <= now:
            key = due[0][1]
            entry = entries.get(key)
            if entry is not None and entry[1] > now:  # written again since: due later
                heapq.heapreplace(due, (entry[1], key))
                continue
            heapq.heappop(due)
            if entry is not None:
                del entries[key]

    def _evict(self) -> None:
        entries = self._entries
        while len(entries) > self.max_keys:
            entries.popitem(last=False)
            self.evictions += 1
        # The evicted keys' heap items stay until due; rebuild once they outnumber the live ones.
        if len(self._due) > _HEAP_SLACK * len(entries) + _HEAP_FLOOR:
            self._due = [(expires_at, key) for key, (_, expires_at) in entries.items()]
            heapq.heapify(self._due)
