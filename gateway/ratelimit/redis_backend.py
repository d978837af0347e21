"""Rate limits shared by every gateway instance through Redis (standalone or Cluster).

One round trip per request: script.lua evaluates every limit of a request atomically, all or nothing, on
Redis server time (instances' clocks never matter), via EVALSHA. The script is loaded once; on NOSCRIPT
(Redis restarted, SCRIPT FLUSH, a new cluster node) it is loaded again and the command retried once.

Coalescing: check() only queues its EVALSHA. One flusher task per backend sends the queue as a
non-transactional pipeline; everything queued while that round trip is in flight goes out together in the
next one, so under load a worker pays one round trip per batch, not per request. Each request keeps its own
EVALSHA, so atomicity is per request, exactly as without batching.

Redis Cluster: all keys of one EVALSHA must live in one hash slot, so a request's limits are grouped by the
slot of their key (keys carry a hash tag per identity, e.g. "gw:rl:{c:42}:customer"; an override hash must
share its limit's tag). One group per identity is the normal case: still one EVALSHA. When a request spans
several slots, its groups are evaluated concurrently (same pipeline, the cluster client fans out per node),
each all or nothing on its own. If a group rejected while another admitted, the admitted groups are
REFUNDED by refund.lua (GCRA: TAT -= cost * T; quota: DECRBY cost), so a rejected request still consumes
nothing. Until the refund lands (one more round trip), those limits briefly look fuller than they are: the
error is in the strict direction (a concurrent request may be rejected), never an over-admission. A failed
refund is logged and otherwise ignored for the same reason.

Errors (ConnectionError, TimeoutError, other RedisError) propagate to the caller unchanged; budgets and the
fallback to memory are the caller's business. Note that redis-py retries a pipeline whose connection broke
(the client's Retry policy; a cluster pipeline retries failed nodes): a command the server ran before the
break can then count twice, again only in the strict direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
import structlog
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from gateway.ratelimit.types import Decision, Limit

log = structlog.get_logger("gateway.ratelimit")

FIELDS_IN = 9  # ARGV values per limit, see script.lua
FIELDS_OUT = 6  # reply values per limit


@dataclass
class _Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        # Known up front, so EVALSHA never waits for SCRIPT LOAD's reply to learn it.
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


def _load_script(name: str) -> _Script:
    return _Script(name, importlib.resources.files(__package__).joinpath(name).read_text("utf-8"))


CHECK = _load_script("script.lua")
REFUND = _load_script("refund.lua")


@dataclass(slots=True)
class _Call:
    script: _Script
    args: list[Any]  # numkeys, *keys, *argv
    future: asyncio.Future[Any]


@dataclass
class BatchStats:
    """What coalescing achieved: requests per round trip = commands / round_trips."""

    round_trips: int = 0  # pipelines sent (a cluster pipeline fans out to nodes concurrently)
    commands: int = 0  # EVALSHAs sent
    largest: int = 0  # most EVALSHAs in one pipeline
    script_loads: int = 0


class RedisBackend:
    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
        *,
        max_batch: int = 1000,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock` is for tests only: evaluate at that time instead of Redis server time. The client stays
        the caller's: close() does not close it."""
        self._client = client
        self._cluster = isinstance(client, redis.asyncio.RedisCluster)
        self._max_batch = max_batch
        self._clock = clock
        self._loaded = False
        self._queue: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sent_at: float | None = None  # perf_counter when the round trip in flight went out
        self.stats = BatchStats()

    def waiting_for_reply(self) -> float:
        """Seconds the round trip in flight has been waiting for Redis; 0.0 when none is in flight."""
        return 0.0 if self._sent_at is None else time.perf_counter() - self._sent_at

    async def check(self, limits: Sequence[Limit]) -> list[Decision]:
        if not limits:
            return []
        groups = self._groups(limits)
        # Queued in the same tick, so every group of this request rides in the same pipeline.
        futures = [self._submit(CHECK, self._check_args([limits[i] for i in group])) for group in groups]
        replies = await asyncio.gather(*futures)
        decisions: list[Decision | None] = [None] * len(limits)
        intervals: list[float] = [0.0] * len(limits)
        for group, reply in zip(groups, replies, strict=True):
            for j, i in enumerate(group):
                decisions[i], intervals[i] = _decode(limits[i], reply[j * FIELDS_OUT : (j + 1) * FIELDS_OUT])
        result = [d for d in decisions if d is not None]
        if len(groups) > 1 and any(d.enforced_reject for d in result):
            await self._refund(limits, groups, result, intervals)
        return result

    async def close(self) -> None:
        """Stops the flusher; checks still queued fail with CancelledError."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()  # if it never started, its `finally` never runs: hence the reset above
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        for call in self._queue:
            call.future.cancel()
        self._queue.clear()

    def _groups(self, limits: Sequence[Limit]) -> list[list[int]]:
        if not self._cluster:
            return [list(range(len(limits)))]
        by_slot: dict[int, list[int]] = {}
        for i, lim in enumerate(limits):
            slot = key_slot(lim.storage_key.encode())
            if lim.override_key is not None and key_slot(lim.override_key.encode()) != slot:
                raise ValueError(
                    f"{lim.policy}: override key {lim.override_key!r} must share the hash tag of {lim.key!r}"
                )
            by_slot.setdefault(slot, []).append(i)
        return list(by_slot.values())

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    def _check_args(self, limits: Sequence[Limit]) -> list[Any]:
        keys = [lim.storage_key for lim in limits]
        argv: list[Any] = [self._now_arg(), len(limits)]
        for lim in limits:
            override = 0
            if lim.override_key is not None:
                keys.append(lim.override_key)
                override = len(keys)
            argv += [
                lim.algorithm, lim.limit, repr(float(lim.rate)), repr(float(lim.period)),
                repr(float(lim.window_end)), lim.cost, "1" if lim.shadow else "0", lim.policy, override,
            ]  # fmt: skip
        return [len(keys), *keys, *argv]

    async def _refund(
        self,
        limits: Sequence[Limit],
        groups: list[list[int]],
        decisions: list[Decision],
        intervals: list[float],
    ) -> None:
        futures = []
        for group in groups:
            if any(decisions[i].enforced_reject for i in group):
                continue  # this group's script rejected, so it consumed nothing
            consumed = [i for i in group if decisions[i].allowed]
            if not consumed:
                continue
            argv: list[Any] = [self._now_arg()]
            for i in consumed:
                lim = limits[i]
                argv += [
                    lim.algorithm,
                    repr(lim.cost * intervals[i]) if lim.algorithm == "gcra" else lim.cost,
                ]
            keys = [limits[i].storage_key for i in consumed]
            futures.append(self._submit(REFUND, [len(keys), *keys, *argv]))
        # Shielded: a caller cancelled now must not leave the other slots over-counted.
        for outcome in await asyncio.shield(asyncio.gather(*futures, return_exceptions=True)):
            if isinstance(outcome, RedisError):
                # Leaves those limits over-counted until they drain: strict, not lenient, so no retry.
                log.warning("ratelimit_refund_failed", error=type(outcome).__name__)
            elif isinstance(outcome, BaseException):
                raise outcome

    def _submit(self, script: _Script, args: list[Any]) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(script, args, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = [call for call in self._queue[: self._max_batch] if not call.future.done()]
                del self._queue[: self._max_batch]
                if batch:
                    self._sent_at = time.perf_counter()
                    try:
                        await self._send(batch)
                    finally:
                        self._sent_at = None
        finally:
            if self._flusher is asyncio.current_task():  # close() may have replaced it already
                self._flusher = None

    async def prepare(self) -> None:
        """Connect and load the scripts now, before any request: done by the first check instead, under
        load, that extra work could outlast the caller's budget and look like a slow Redis."""
        await self._ensure_loaded()

    async def _ensure_loaded(self) -> None:
        if not self._loaded:
            # Refunds only happen in a cluster; elsewhere refund.lua is never needed.
            for script in (CHECK, REFUND) if self._cluster else (CHECK,):
                await self._load(script)
            self._loaded = True

    async def _send(self, batch: list[_Call]) -> None:
        try:
            await self._ensure_loaded()
            replies = await self._pipeline(batch)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                # Only these did not run, so only these are retried: the others have consumed already.
                retry = [batch[i] for i in missing]
                try:
                    for script in {call.script.name: call.script for call in retry}.values():
                        await self._load(script)
                    retried = await self._pipeline(retry)
                except Exception as exc:
                    retried = [exc] * len(retry)
                for i, reply in zip(missing, retried, strict=True):
                    replies[i] = reply
        except asyncio.CancelledError:  # close(): nobody will answer these
            for call in batch:
                call.future.cancel()
            raise
        except Exception as exc:  # the round trip failed as a whole: every request in it sees the error
            replies = [exc] * len(batch)
        self._settle(batch, replies)

    @staticmethod
    def _settle(calls: list[_Call], replies: list[Any]) -> None:
        for call, reply in zip(calls, replies, strict=True):
            if call.future.done():
                continue  # the caller gave up (cancelled by its deadline)
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            # Not pipe.evalsha(): redis-py blocks that method on cluster pipelines, though it routes the raw
            # command by its keys just fine.
            pipe.execute_command("EVALSHA", call.script.sha, *call.args)
        self.stats.round_trips += 1
        self.stats.commands += len(calls)
        self.stats.largest = max(self.stats.largest, len(calls))
        # Errors come back in place, so one bad command fails only its own request.
        return list(await pipe.execute(raise_on_error=False))

    async def _load(self, script: _Script) -> None:
        # A cluster client sends SCRIPT LOAD to every primary.
        sha = await self._client.script_load(script.source)
        self.stats.script_loads += 1
        if sha != script.sha:
            raise RuntimeError(f"{script.name}: Redis hashed it to {sha}, expected {script.sha}")


def _decode(lim: Limit, values: Sequence[Any]) -> tuple[Decision, float]:
    """One limit's slice of the script reply (bytes or str, whichever the client decodes to)."""
    allowed, remaining, eff_limit, reset_after, retry_after, interval = values
    decision = Decision(
        policy=lim.policy,
        allowed=bool(int(allowed)),
        shadow=lim.shadow,
        limit=int(eff_limit),
        remaining=int(remaining),
        reset_after=float(reset_after),
        retry_after=float(retry_after),
    )
    return decision, float(interval)
