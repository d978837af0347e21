"""The in-process backend: per-instance limits (client IP tiers) and a fallback when Redis is down.

Same semantics as RedisBackend (both run gateway.ratelimit.algorithms.evaluate). Memory is bounded by
`max_keys`:

- an entry goes when it expires, like the Redis key would: a GCRA bucket once it is full again, a quota
  counter after its window's grace. An expired entry reads as absent at once, and is dropped within two
  seconds by a timing wheel of one-second slots, swept on every call (and by `expire()`, which the gateway
  also runs once a second), so the table holds only buckets in use;
- a full table forgets its least recently used entry. That client starts again from a full bucket: eviction
  can only admit more, never fewer, and `evictions` counts it happening.

Every operation is O(1), and a sweep drops at most `_SWEEP_BATCH` entries per call. (A heap of entries by
due time keeps evicted keys until they are due; rebuilding it to shed them stalled the event loop for
~50 ms at 100,000 keys during an eviction flood.)
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from gateway.ratelimit.algorithms import effective, evaluate, gcra_expiry
from gateway.ratelimit.types import Decision, Limit

DEFAULT_MAX_KEYS = 100_000
# Entries one call drops at most: a slot that expires many keys at once (a quota window's end) is spread
# over several calls instead of one long pause. Expired entries read as absent meanwhile.
_SWEEP_BATCH = 1000


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
        # The timing wheel: second -> the keys whose expires_at falls in it (each key in exactly one slot, no
        # slot empty), and a heap of those seconds (which may still list seconds of slots gone since).
        self._slots: dict[int, set[str]] = {}
        self._slot_order: list[int] = []
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
        self._sweep(now)
        entries = self._entries

        def read(key: str) -> float | None:
            entry = entries.get(key)
            if entry is None:
                return None
            if entry[1] <= now:  # expired, its slot not swept yet
                self._drop(key, entry[1])
                return None
            entries.move_to_end(key)
            return entry[0]

        decisions, writes = evaluate(limits, now, read, self._read_override)
        for write in writes:
            self._store(write.key, write.value, write.expires_at)
        # The sweep above emptied passed slots (a batch is more than one call adds): eviction takes entries
        # still live, or expired within the current second.
        while len(entries) > self.max_keys:
            key, (_, expires_at) = entries.popitem(last=False)
            self._unslot(key, expires_at)
            self.evictions += 1
        return decisions

    def expire(self) -> None:
        """Drop entries that have expired (check() does this too; an idle gateway calls this)."""
        self._sweep(self._clock())

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
                if state <= now:  # full again: nothing left to remember
                    self._drop(key, expires_at)
                    continue
                expires_at = gcra_expiry(now, state)
            else:  # one counter per window: a grant from an earlier window touches a key no longer in use
                state = max(0.0, state - lim.cost)
            self._store(key, state, expires_at, recent=False)

    async def close(self) -> None:
        self._entries.clear()
        self._slots.clear()
        self._slot_order.clear()

    def _read_override(self, override_key: str, field: str) -> str | None:
        return self._overrides.get(override_key, {}).get(field)

    def _store(self, key: str, state: float, expires_at: float, *, recent: bool = True) -> None:
        entries = self._entries
        slot = math.floor(expires_at)
        old = entries.get(key)
        if old is None or math.floor(old[1]) != slot:
            if old is not None:
                self._unslot(key, old[1])
            keys = self._slots.get(slot)
            if keys is None:
                keys = self._slots[slot] = set()
                self._order_slot(slot)
            keys.add(key)
        entries[key] = (state, expires_at)
        if recent:
            entries.move_to_end(key)

    def _drop(self, key: str, expires_at: float) -> None:
        del self._entries[key]
        self._unslot(key, expires_at)

    def _unslot(self, key: str, expires_at: float) -> None:
        """Take a key out of its slot. An emptied slot goes at once, so slots never outnumber keys (a GCRA
        policy whose backlog reaches a day ahead would otherwise leave a slot per second of it)."""
        slot = math.floor(expires_at)
        keys = self._slots[slot]
        keys.discard(key)
        if not keys:
            del self._slots[slot]

    def _order_slot(self, slot: int) -> None:
        """Add a slot's second to the heap. Seconds of slots gone since stay in it until due; once they
        outnumber the live ones it is rebuilt (O(slots), so amortised O(1) per new slot)."""
        order = self._slot_order
        heapq.heappush(order, slot)
        if len(order) > 2 * len(self._slots) + _SWEEP_BATCH:
            self._slot_order = list(self._slots)
            heapq.heapify(self._slot_order)

    def _sweep(self, now: float) -> None:
        """Drop the entries of every slot that has wholly passed, at most _SWEEP_BATCH of them."""
        order, slots, entries = self._slot_order, self._slots, self._entries
        budget = _SWEEP_BATCH
        while order and order[0] + 1 <= now:
            slot = order[0]
            keys = slots.get(slot)  # None: emptied earlier, or a second listed twice
            while keys:
                if budget == 0:
                    return
                del entries[keys.pop()]
                budget -= 1
            slots.pop(slot, None)
            heapq.heappop(order)
