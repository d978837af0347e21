"""Rate limits shared by every gateway instance through Redis (standalone, Sentinel or Cluster).

One round trip per request: script.lua evaluates every limit of a request atomically, all or nothing, on
Redis server time (instances' clocks never matter), via EVALSHA. The script is loaded once; on NOSCRIPT
(Redis restarted, SCRIPT FLUSH, a new cluster node) it is loaded again and the command retried once.

The hot path (why it does not go through redis-py's pipeline object)
--------------------------------------------------------------------
redis-py still opens, authenticates, selects the database, resolves the Sentinel master and addresses the
Cluster nodes: every connection used here is one of its `Connection`s, taken from the client's pool (or a
cluster node's) and kept. Once it is connected, its transport is switched to `_Link`, a small protocol of
this module that writes pre-packed EVALSHAs and parses replies with hiredis as they arrive:

- arguments are packed here, straight to RESP: the static part of each policy's arguments (algorithm,
  limit, rate, period, shadow, name) is one pre-encoded string, packed once per policy values and cached,
  and the command header once per argument count; per request only the keys, the cost and a quota's window
  end are encoded (redis-py packed ~25 arguments per EVALSHA, each through its type checks);
- coalescing is loop-level: every check queued during one event-loop iteration goes out in one write at the
  end of it (one `call_soon` per iteration), as one batch with ONE future that its requests await, each then
  reading its own reply by index. Batches are pipelined on the connection (the next one does not wait for
  the previous reply); replies are matched to batches in order;
- no per-request `asyncio.timeout`, `gather`, task or future: one deadline timer per batch.

Measured with `python -m benchmarks --duration 8 --only gateway+jwt,gateway+jwt+ratelimit` on the 2-core
development box (CPU µs per request of the rate-limit stage, gateway+jwt+ratelimit minus gateway+jwt, two
runs each, a noisy shared box): +322 and +235 through redis-py's pipeline with a per-request asyncio.timeout,
futures and gather (and 285 checks fell back with Redis healthy); +253 and +119 with this module (none fell
back). Parsing stays hiredis's, connection handling redis-py's: only the pipelining is written here.

The budget: measured from the write to the read
-----------------------------------------------
`check(limits, budget=...)` (ResilientBackend passes `rate_limit.redis_budget`) bounds the time from the
moment a batch was WRITTEN to its connection to the moment its last reply was READ. Time a check spends
queued in a busy event loop before its batch is written is not charged, and neither is time a reply spends
unread in the socket because the process was descheduled: the deadline timer does not judge by itself.
uvloop runs due timers BEFORE it polls I/O in an iteration, so a process woken up past the deadline would
see its timer first while the reply sits unread; the timer therefore only schedules the verdict two
`call_soon` hops later, which always lands after at least one I/O poll that happened after the deadline
(asyncio and uvloop alike, see `_Link._deadline`), and replies are parsed in the protocol's data_received,
inside that poll. A batch with no reply by then is late: its checks raise redis TimeoutError (the caller
falls back and counts a Redis failure), and the connection keeps reading its replies in order until the
connection's socket_timeout (1 s from gateway.redis_client), when it is closed.

A batch that cannot even be written (the connection is being opened) waits for redis-py's connect and
handshake timeouts, and at most max(UNSENT_BOUND, UNSENT_BUDGETS budgets) in any case: then its checks
raise redis TimeoutError too (a Redis that does not accept a connection is failing).

Exactness: a check that fell back after its command was written may still be executed by Redis (a paused
server works through its socket buffer later), so an outage can count a request both locally and in Redis.
With a healthy Redis nothing of the kind happens: loop queueing never fails a check, so nothing falls back.

Redis Cluster: all keys of one EVALSHA must live in one hash slot, so a request's limits are grouped by the
slot of their key (keys carry a hash tag per identity, e.g. "gw:rl:{c:42}:customer"; an override hash must
share its limit's tag). One group per identity is the normal case: still one EVALSHA. When a request spans
several slots, its groups go out in the same iteration (one link per node), each all or nothing on its own.
If a group rejected while another admitted, the admitted groups are REFUNDED by refund.lua (GCRA: TAT -=
cost * T; quota: DECRBY cost), so a rejected request still consumes nothing. Until the refund lands (one
more round trip), those limits briefly look fuller than they are: the error is in the strict direction (a
concurrent request may be rejected), never an over-admission. A failed refund is logged and otherwise
ignored for the same reason. A MOVED/ASK/TRYAGAIN/CLUSTERDOWN reply is retried once through redis-py's
cluster client, which follows the redirection and refreshes its slot map (later checks route by it).

Cluster failover: a dead master answers no MOVED, so a connection to a node that FAILS (lost, closed at the
socket timeout, or not even opened; not a batch that merely ran out of its budget) does what redis-py's own
cluster client does on a ConnectionError or TimeoutError (RedisCluster._execute_command): the node's idle
connections are marked for reconnect, the node goes to the end of the nodes cache (a refresh asks it last),
another node becomes the default one if it was, and a slot-map refresh is requested (_request_refresh). The
refresh (RedisCluster.initialize, which queries the nodes and keeps the current map if none answers) runs in
a background task that no check awaits: one at a time, at most one every REFRESH_INTERVAL, and only when
redis-py's own pacing (topology_refresh_min_interval, its backoff after failed refreshes) says it is due;
otherwise the next check or failure starts it. Checks are routed by the map per check, so once the replica
is promoted and a refresh has seen it, that slot's checks go to the new master (NOSCRIPT there: the scripts
are loaded again). Until then they fail and fall back. Connections to nodes that left the map, or no longer
serve slots, are closed once their batches have settled. redis-py's cluster errors that are not RedisErrors
(RedisClusterException: no node reachable, a slot not covered) are raised as ClusterError, so the caller
falls back as for any Redis failure.

Sentinel failover needs none of this: every connection is opened by redis-py's Sentinel-managed connection,
which asks Sentinel for the master's address. A connection to a master that died is lost; a master that
Sentinel demotes has its clients disconnected by Sentinel (and would answer READONLY, which gives the
connection up too); either way the next connection goes to the master Sentinel names then. An old master
that is still up keeps the counts until Sentinel demotes it (some seconds after a manual failover), as
redis-py's own pooled connections would.

Errors (ConnectionError, TimeoutError, other RedisError) propagate to the caller unchanged (but for redis-py's
cluster exceptions, as ClusterError); budgets' consequences and the fallback to memory are the caller's
business.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import importlib.resources
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio
import structlog
from redis.cluster import PRIMARY
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    ClusterError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.ratelimit.types import Decision, Limit

log = structlog.get_logger("gateway.ratelimit")

FIELDS_IN = 4  # ARGV values per limit, see script.lua
FIELDS_OUT = 6  # reply values per limit
UNSENT_BOUND = 1.0  # seconds a batch may wait for a connection at least, whatever the budget...
UNSENT_BUDGETS = 4  # ...and at least this many budgets
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
REFRESH_INTERVAL = 1.0  # seconds between two cluster slot-map refreshes this backend asks for, at least
# Connection errors that say nothing about the node (redis-py's own list where it has one).
_NOT_NODE_FAILURES: tuple[type[BaseException], ...] = getattr(
    redis.asyncio.RedisCluster, "NOT_NODE_FAILURE_ERRORS", (AuthenticationError, MaxConnectionsError)
)
_SPEC_CACHE_MAX = 10_000


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


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


_SMALL = tuple(_bulk(b"%d" % i) for i in range(256))
_EMPTY = _bulk(b"")
_ZERO = _SMALL[0]


def _int(value: int) -> bytes:
    return _SMALL[value] if 0 <= value < 256 else _bulk(b"%d" % value)


@dataclass
class BatchStats:
    """What coalescing achieved: requests per round trip = commands / round_trips."""

    round_trips: int = 0  # batches written (a request spanning cluster nodes writes one per node)
    commands: int = 0  # EVALSHAs sent
    largest: int = 0  # most EVALSHAs in one batch
    script_loads: int = 0
    topology_refreshes: int = 0  # cluster slot-map refreshes run after a node's connection failed


class _BatchFuture(asyncio.Future[None]):
    """The one future of a batch, awaited by all its checks: a waiter that is cancelled must not cancel it
    for the others, so cancel() refuses; the waiter's task is then cancelled when the batch settles (within
    the budget, or the socket timeout). close() cancels it for real."""

    def cancel(self, msg: Any = None) -> bool:
        return False

    def cancel_now(self) -> bool:
        return super().cancel()


class _Batch:
    """The checks of one event-loop iteration for one connection: written together, answered in order."""

    __slots__ = ("answered", "budget", "commands", "error", "future", "generation", "late", "replies")

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: float | None, generation: int) -> None:
        self.commands: list[bytes] = []
        self.replies: list[Any] = []
        self.future = _BatchFuture(loop=loop)
        self.error: BaseException | None = None
        self.budget = budget
        self.generation = generation  # script loads seen when queued (NOSCRIPT: reload once per generation)
        self.late = False
        self.answered = False

    def settle(self, error: BaseException | None = None) -> None:
        if not self.future.done():
            self.error = error
            self.future.set_result(None)

    def reply(self, index: int) -> Any:
        error = self.error
        if error is not None:
            raise type(error)(*error.args)  # a fresh exception per check: no shared traceback
        return self.replies[index]


class _Link(asyncio.Protocol):
    """One connected redis-py Connection whose transport now speaks to this protocol: batches written in
    order, replies parsed with hiredis in data_received and handed to the oldest batch in flight."""

    def __init__(
        self,
        conn: Any,
        transport: asyncio.Transport,
        release: Callable[[Any], Awaitable[None]],
        failed: Callable[[BaseException], None] | None = None,
    ):
        self.conn = conn
        self.transport = transport
        self.closed = False
        self._release = release
        self._failed = failed  # told once when the connection is lost or given up (not on close())
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._inflight: collections.deque[_Batch] = collections.deque()
        self._hard: float | None = conn.socket_timeout or None
        self._original = transport.get_protocol()
        self._dropping = False
        transport.set_protocol(self)

    def write(self, batch: _Batch) -> None:
        self.transport.write(b"".join(batch.commands))
        written_at = self._loop.time()
        self._inflight.append(batch)
        delay = batch.budget if batch.budget is not None else self._hard
        if delay is not None:
            self._loop.call_at(written_at + delay, self._deadline, batch, written_at)

    # The deadline: a timer, then two call_soon hops, then the verdict. A callback scheduled by call_soon
    # from a ready callback runs in the NEXT loop iteration, and every iteration polls I/O once between
    # running ready callbacks (asyncio: poll, timers, ready; uvloop/libuv: timers, idle = ready, poll). So
    # at least one poll separates the timer from the verdict, however late the timer ran, and a reply that
    # arrived by then has been parsed in data_received.
    def _deadline(self, batch: _Batch, written_at: float) -> None:
        if not batch.answered:
            self._loop.call_soon(self._deadline_polled, batch, written_at)

    def _deadline_polled(self, batch: _Batch, written_at: float) -> None:
        if not batch.answered:
            self._loop.call_soon(self._verdict, batch, written_at)

    def _verdict(self, batch: _Batch, written_at: float) -> None:
        if batch.answered or self.closed:
            return
        if batch.budget is not None and not batch.late:
            batch.late = True
            budget_ms = round(batch.budget * 1000)
            batch.settle(
                RedisTimeoutError(f"No reply from Redis {budget_ms} ms after the command was written")
            )
            if self._hard is not None:
                # Still read in order when it comes; the connection goes at the socket timeout.
                at = max(written_at + self._hard, self._loop.time())
                self._loop.call_at(at, self._deadline, batch, written_at)
            return
        self.abort(RedisTimeoutError("Timeout reading from socket"))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        inflight = self._inflight
        reader.feed(data)
        readonly = False
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(RedisConnectionError(f"Protocol error from Redis: {exc}"))
                return
            if reply is False:
                break
            if type(reply) is hiredis.PushNotification:
                # RESP3 (redis-py's default) lets a server push out of band: client-tracking invalidations,
                # maintenance notices. They answer no command, so they must not take a reply's place.
                continue
            if not inflight:
                self.abort(RedisConnectionError("Reply from Redis with no command in flight"))
                return
            if type(reply) is ResponseError and str(reply).startswith("READONLY"):
                readonly = True  # Sentinel failover: this server is a replica now; reconnect to the master
            batch = inflight[0]
            batch.replies.append(reply)
            if len(batch.replies) == len(batch.commands):
                inflight.popleft()
                batch.answered = True
                batch.settle()
        if readonly:
            self.abort(RedisConnectionError("Redis answered READONLY: no longer the master"))

    def connection_lost(self, exc: Exception | None) -> None:
        message = "Connection closed by server." if exc is None else f"Error while reading from socket: {exc}"
        error = RedisConnectionError(message)
        self._fail(error)
        self.closed = True
        # redis-py's own protocol resolves the close waiter its disconnect() awaits.
        self._original.connection_lost(exc)
        self._drop(error)

    def abort(self, error: BaseException) -> None:
        """Fail everything in flight with `error` and give the connection up."""
        self._fail(error)
        self.closed = True
        self.transport.close()
        self._drop(error)

    def _fail(self, error: BaseException) -> None:
        inflight, self._inflight = self._inflight, collections.deque()
        for batch in inflight:
            batch.answered = True
            batch.settle(error)

    def _drop(self, error: BaseException) -> None:
        if not self._dropping:
            self._dropping = True
            task = self._loop.create_task(self._release(self.conn))
            _background.add(task)
            task.add_done_callback(_background.discard)
            if self._failed is not None:
                self._failed(error)

    def cancel_all(self) -> None:
        inflight, self._inflight = self._inflight, collections.deque()
        for batch in inflight:
            batch.answered = True
            batch.future.cancel_now()


_background: set[asyncio.Task[Any]] = set()


class _Pipe:
    """Batches for one Redis server: written to its `_Link`, once one is connected. `node`: the cluster
    node it serves (None: the one server or Sentinel master); `failed`: told of each connection that failed
    (lost, timed out, or not even opened)."""

    def __init__(
        self,
        backend: RedisBackend,
        acquire: Callable[[], Awaitable[Any]],
        release: Callable[[Any], Awaitable[None]],
        node: Any = None,
        failed: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._backend = backend
        self._acquire = acquire
        self._release = release
        self.node = node
        self._failed = failed
        self.link: _Link | None = None
        self.forming: _Batch | None = None
        self._waiting: list[_Batch] = []
        self._connecting: asyncio.Task[None] | None = None
        self.closed = False

    def send(self, batch: _Batch) -> None:
        link = self.link
        if link is not None and not link.closed:
            link.write(batch)
            return
        self.link = None
        if self.closed:  # retired (its node left the slot map) while a retry still held it
            batch.settle(RedisConnectionError("No longer a node of the cluster's slot map"))
            return
        self._waiting.append(batch)
        loop = asyncio.get_running_loop()
        if batch.budget is not None:
            loop.call_later(max(UNSENT_BOUND, UNSENT_BUDGETS * batch.budget), self._unsent, batch)
        if self._connecting is None:
            self._connecting = loop.create_task(self._connect())

    def _unsent(self, batch: _Batch) -> None:
        if batch in self._waiting:
            self._waiting.remove(batch)
            batch.settle(RedisTimeoutError("No connection to Redis within the bound"))

    async def _connect(self) -> None:
        conn = None
        try:
            await self._backend._ensure_loaded()
            try:
                conn = await self._acquire()
            except Exception as exc:
                if self._failed is not None:
                    self._failed(exc)
                raise
            transport = conn._writer.transport  # redis-py connected it (TLS, AUTH, SELECT, Sentinel...)
            link = _Link(conn, transport, self._release, self._failed)
        except asyncio.CancelledError:
            waiting, self._waiting = self._waiting, []
            for batch in waiting:
                batch.future.cancel_now()
            if conn is not None:
                await self._release(conn)
            raise
        except Exception as exc:
            waiting, self._waiting = self._waiting, []
            for batch in waiting:
                batch.settle(exc)
            if conn is not None:
                await self._release(conn)
            return
        finally:
            self._connecting = None
        self.link = link
        waiting, self._waiting = self._waiting, []
        for batch in waiting:
            if not batch.future.done():
                link.write(batch)

    def pending(self) -> list[asyncio.Future[None]]:
        """The futures of the batches not settled yet: forming, waiting for a connection, or in flight."""
        batches = [*self._waiting, *(self.link._inflight if self.link is not None else ())]
        if self.forming is not None:
            batches.append(self.forming)
        return [batch.future for batch in batches if not batch.future.done()]

    async def close(self) -> None:
        self.closed = True
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            try:
                await connecting
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
        waiting, self._waiting = self._waiting, []
        for batch in waiting:
            batch.future.cancel_now()
        if self.forming is not None:
            self.forming.future.cancel_now()
            self.forming = None
        link, self.link = self.link, None
        if link is not None and not link.closed:
            link.cancel_all()
            link.closed = True
            link._dropping = True  # released here, not again by connection_lost
            link.transport.close()
            await self._release(link.conn)


class RedisBackend:
    """Shared limits in Redis; `enforces_budget`: check() takes the budget itself (see the docstring)."""

    enforces_budget = True

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
        *,
        max_batch: int = 1000,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock` is for tests only: evaluate at that time instead of Redis server time. The client stays
        the caller's: close() does not close it (it releases the connections it took from its pool)."""
        self._client = client
        self._cluster = isinstance(client, redis.asyncio.RedisCluster)
        self._max_batch = max_batch
        self._clock = clock
        self._loaded = False
        self._loading: asyncio.Future[None] | None = None
        self._generation = 0  # script loads so far (NOSCRIPT: reload once per generation)
        self._pipes: dict[str, _Pipe] = {}
        self._to_flush: list[tuple[_Pipe, _Batch]] = []
        self._flush_scheduled = False
        self._specs: dict[tuple[Any, ...], bytes] = {}
        self._headers: dict[tuple[str, int], bytes] = {}
        self._floats: dict[float, bytes] = {}
        self.stats = BatchStats()
        self._refreshing: asyncio.Task[None] | None = None  # the slot-map refresh in flight, if any
        self._refresh_at = 0.0  # loop time before which no other refresh starts
        self._retiring: dict[_Pipe, asyncio.Task[None]] = {}

    # --- checks -------------------------------------------------------------------------------------------

    async def check(self, limits: Sequence[Limit], *, budget: float | None = None) -> list[Decision]:
        """One Decision per Limit. `budget`: seconds from the write of this check's batch to its reply, after
        which it raises redis TimeoutError (None: the connection's socket timeout, if any)."""
        if not limits:
            return []
        if not self._cluster:
            reply = _checked(
                await self._call(self._pipe(None), CHECK, self._pack_check(limits), budget, limits), limits
            )
            return [
                _decode(lim, reply[j * FIELDS_OUT : (j + 1) * FIELDS_OUT])[0] for j, lim in enumerate(limits)
            ]
        try:
            if not self._loaded:
                await self._ensure_loaded()  # the cluster client learns its slots here, before routing
            if self._client._initialize and self._refreshing is None:  # type: ignore[union-attr]
                self._maybe_refresh()  # a refresh was asked for (a node failed) and not run yet
            groups = self._groups(limits)
            calls = []
            for slot, group in groups:
                members = [limits[i] for i in group]
                calls.append(self._queue(self._pipe(slot), self._pack_check(members), budget))
            replies = [await self._finish(call, CHECK, [limits[i] for i in group], budget)
                       for call, (_, group) in zip(calls, groups, strict=True)]  # fmt: skip
        except RedisClusterException as exc:
            # redis-py's cluster errors (no node reachable, a slot not covered) are not RedisErrors: make them
            # one, so the caller falls back as for any other Redis failure.
            raise ClusterError(f"{type(exc).__name__}: {exc}") from exc
        decisions: list[Decision | None] = [None] * len(limits)
        intervals: list[float] = [0.0] * len(limits)
        for (_, group), reply in zip(groups, replies, strict=True):
            _checked(reply, group)
            for j, i in enumerate(group):
                decisions[i], intervals[i] = _decode(limits[i], reply[j * FIELDS_OUT : (j + 1) * FIELDS_OUT])
        result = [d for d in decisions if d is not None]
        if len(groups) > 1 and any(d.enforced_reject for d in result):
            await self._refund(limits, groups, result, intervals, budget)
        return result

    async def _call(
        self, pipe: _Pipe, script: _Script, packed: bytes, budget: float | None, limits: Sequence[Limit]
    ) -> Any:
        return await self._finish(self._queue(pipe, packed, budget), script, limits, budget)

    async def _finish(
        self, queued: tuple[_Batch, int, _Pipe, bytes], script: _Script, limits: Any, budget: float | None
    ) -> Any:
        batch, index, pipe, packed = queued
        for retried in (False, True):
            await batch.future
            reply = batch.reply(index)
            if type(reply) is not ResponseError:
                return reply
            message = str(reply)
            if not message.startswith("NOSCRIPT"):
                break
            if retried:
                raise NoScriptError(message)
            # Only this command did not run, so only it is retried (the others have consumed already).
            await self._reload(batch.generation)
            batch, index, _, _ = self._queue(pipe, packed, budget)
        if self._cluster and message.startswith(_REDIRECTS):
            # Slot moved (resharding, failover): redis-py follows it and refreshes the slot map we route by.
            args = self._check_args(limits) if script is CHECK else limits
            return await self._client.execute_command("EVALSHA", script.sha, *args)
        raise reply

    def _queue(self, pipe: _Pipe, packed: bytes, budget: float | None) -> tuple[_Batch, int, _Pipe, bytes]:
        batch = pipe.forming
        if batch is None or len(batch.commands) >= self._max_batch:
            batch = pipe.forming = _Batch(asyncio.get_running_loop(), budget, self._generation)
            self._to_flush.append((pipe, batch))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif budget is not None and (batch.budget is None or budget < batch.budget):
            batch.budget = budget
        batch.commands.append(packed)
        return batch, len(batch.commands) - 1, pipe, packed

    def _flush(self) -> None:
        """End of the iteration: every batch formed in it goes out, one write per connection."""
        self._flush_scheduled = False
        to_flush, self._to_flush = self._to_flush, []
        stats = self.stats
        for pipe, batch in to_flush:
            if pipe.forming is batch:
                pipe.forming = None
            if batch.future.done():  # close()
                continue
            stats.round_trips += 1
            stats.commands += len(batch.commands)
            if len(batch.commands) > stats.largest:
                stats.largest = len(batch.commands)
            pipe.send(batch)

    def _pipe(self, slot: int | None) -> _Pipe:
        if slot is None:
            pipe = self._pipes.get("")
            if pipe is None:
                pool = self._client.connection_pool  # type: ignore[union-attr]

                async def release(conn: Any) -> None:
                    await conn.disconnect(nowait=True)
                    await pool.release(conn)

                pipe = self._pipes[""] = _Pipe(self, pool.get_connection, release)
            return pipe
        node = self._client.nodes_manager.get_node_from_slot(slot)  # type: ignore[union-attr]
        pipe = self._pipes.get(node.name)
        if pipe is None or pipe.node is not node:
            if pipe is not None:
                self._retire(pipe)  # the node left the slot map and came back: a new ClusterNode

            async def acquire() -> Any:
                conn = node.acquire_connection()
                try:
                    await conn.connect()
                except BaseException:
                    node.release(conn)
                    raise
                return conn

            async def release_node(conn: Any) -> None:
                await conn.disconnect(nowait=True)
                node.release(conn)

            def failed(error: BaseException) -> None:
                self._node_failed(node, error)

            pipe = self._pipes[node.name] = _Pipe(self, acquire, release_node, node, failed)
        return pipe

    # --- cluster failover ---------------------------------------------------------------------------------

    def _node_failed(self, node: Any, error: BaseException) -> None:
        """A connection to a cluster node failed: what redis-py's cluster client does on a ConnectionError or
        TimeoutError (RedisCluster._execute_command), then a refresh of the slot map, in the background."""
        if isinstance(error, _NOT_NODE_FAILURES) or not isinstance(
            error, RedisConnectionError | RedisTimeoutError | OSError
        ):
            return
        client: Any = self._client
        manager = client.nodes_manager
        # The node's idle connections reconnect when next used; the refresh asks this node last.
        mark = getattr(node, "_mark_free_connections_for_reconnect_on_error", None)
        if mark is not None and isinstance(error, RedisConnectionError):
            mark(error)
        manager.move_node_to_end_of_cached_nodes(node.name)
        if manager.default_node is node:
            client.replace_default_node()
        request = getattr(client, "_request_refresh", None)
        if request is not None:
            request(last_failed_node_name=node.name)
        else:  # an older redis-py: its initialize() refreshes whenever this is set
            client._initialize = True
        self._maybe_refresh()

    def _maybe_refresh(self) -> None:
        """Start the refresh redis-py was asked for, unless one is running, one started less than
        REFRESH_INTERVAL ago, or redis-py's own pacing (topology_refresh_min_interval, its backoff after
        failed refreshes) says it is not due: then a later check or failure starts it. Never awaited by a
        check."""
        if self._refreshing is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self._refresh_at:
            return
        client: Any = self._client
        due = getattr(client, "_initialize_due", None)
        if not client._initialize or (due is not None and not due()):
            return
        self._refresh_at = now + REFRESH_INTERVAL
        self.stats.topology_refreshes += 1
        self._refreshing = loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            # Single flight with redis-py's own refreshes (its lock); on failure it keeps the current map and
            # stays asked, so the next check or failure tries again once due.
            await self._client.initialize()  # type: ignore[union-attr]
        except Exception as exc:
            log.warning("ratelimit_cluster_refresh_failed", error=type(exc).__name__, detail=str(exc))
        finally:
            self._refreshing = None
        # Connections to nodes that no longer serve slots are given back (after their last replies).
        manager: Any = self._client.nodes_manager  # type: ignore[union-attr]
        for name, pipe in list(self._pipes.items()):
            current = manager.nodes_cache.get(name)
            if current is not pipe.node or getattr(current, "server_type", PRIMARY) != PRIMARY:
                self._retire(pipe)

    def _retire(self, pipe: _Pipe) -> None:
        """Take `pipe` out of routing now; close it once its batches have settled (each has a deadline)."""
        if self._pipes.get(pipe.node.name) is pipe:
            del self._pipes[pipe.node.name]

        async def retire() -> None:
            try:
                while pending := pipe.pending():
                    await asyncio.wait(pending)
                await pipe.close()
            finally:
                self._retiring.pop(pipe, None)

        if pipe not in self._retiring:
            self._retiring[pipe] = asyncio.get_running_loop().create_task(retire())

    async def close(self) -> None:
        """Cancels every check still waiting and gives the connections back (the client stays open)."""
        for batch in (b for _, b in self._to_flush):
            batch.future.cancel_now()
        self._to_flush.clear()
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None:
            refreshing.cancel()  # redis-py keeps its current map when a refresh is cancelled
            await asyncio.gather(refreshing, return_exceptions=True)
        retiring, self._retiring = self._retiring, {}
        for task in retiring.values():
            task.cancel()
        await asyncio.gather(*retiring.values(), return_exceptions=True)
        pipes, self._pipes = [*self._pipes.values(), *retiring], {}
        for pipe in pipes:
            await pipe.close()

    def _groups(self, limits: Sequence[Limit]) -> list[tuple[int, list[int]]]:
        by_slot: dict[int, list[int]] = {}
        for i, lim in enumerate(limits):
            slot = key_slot(lim.storage_key.encode())
            if lim.override_key is not None and key_slot(lim.override_key.encode()) != slot:
                raise ValueError(
                    f"{lim.policy}: override key {lim.override_key!r} must share the hash tag of {lim.key!r}"
                )
            by_slot.setdefault(slot, []).append(i)
        return list(by_slot.items())

    # --- packing ------------------------------------------------------------------------------------------

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    def _spec(self, lim: Limit) -> bytes:
        """A policy's static arguments as one RESP bulk string, packed once per distinct values."""
        key = (lim.policy, lim.algorithm, lim.limit, lim.rate, lim.period, lim.shadow)
        spec = self._specs.get(key)
        if spec is None:
            if len(self._specs) >= _SPEC_CACHE_MAX:
                self._specs.clear()
            text = (
                f"{lim.algorithm} {lim.limit} {float(lim.rate)!r} {float(lim.period)!r} "
                f"{'1' if lim.shadow else '0'} {lim.policy}"
            )
            spec = self._specs[key] = _bulk(text.encode())
        return spec

    def _float(self, value: float) -> bytes:
        packed = self._floats.get(value)
        if packed is None:
            if len(self._floats) >= _SPEC_CACHE_MAX:
                self._floats.clear()
            packed = self._floats[value] = _bulk(repr(float(value)).encode())
        return packed

    def _header(self, script: _Script, argc: int) -> bytes:
        header = self._headers.get((script.sha, argc))
        if header is None:
            header = self._headers[(script.sha, argc)] = b"*%d\r\n$7\r\nEVALSHA\r\n%s" % (
                argc,
                _bulk(script.sha.encode()),
            )
        return header

    def _pack_check(self, limits: Sequence[Limit]) -> bytes:
        keys = [_bulk(lim.storage_key.encode()) for lim in limits]
        argv = [_EMPTY if self._clock is None else _bulk(self._now_arg().encode()), _int(len(limits))]
        for lim in limits:
            override = 0
            if lim.override_key is not None:
                keys.append(_bulk(lim.override_key.encode()))
                override = len(keys)
            argv += (
                self._spec(lim),
                _ZERO if lim.algorithm == "gcra" else self._float(lim.window_end),
                _int(lim.cost),
                _int(override),
            )
        return b"".join((self._header(CHECK, 3 + len(keys) + len(argv)), _int(len(keys)), *keys, *argv))

    def _check_args(self, limits: Sequence[Limit]) -> list[Any]:
        """The same arguments unpacked, for redis-py (the cluster redirection path only)."""
        keys: list[Any] = [lim.storage_key for lim in limits]
        argv: list[Any] = [self._now_arg(), len(limits)]
        for lim in limits:
            override = 0
            if lim.override_key is not None:
                keys.append(lim.override_key)
                override = len(keys)
            window_end = 0 if lim.algorithm == "gcra" else repr(lim.window_end)
            argv += [self._spec(lim).split(b"\r\n")[1], window_end, lim.cost, override]
        return [len(keys), *keys, *argv]

    # --- refunds (cluster only) ---------------------------------------------------------------------------

    async def _refund(
        self,
        limits: Sequence[Limit],
        groups: list[tuple[int, list[int]]],
        decisions: list[Decision],
        intervals: list[float],
        budget: float | None,
    ) -> None:
        queued = []
        for slot, group in groups:
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
            args = [len(keys), *keys, *argv]
            packed = hiredis.pack_command(("EVALSHA", REFUND.sha, *args))
            queued.append((self._queue(self._pipe(slot), packed, budget), args))
        # Shielded: a caller cancelled now must not leave the other slots over-counted.
        outcomes = await asyncio.shield(
            asyncio.gather(
                *(self._finish(q, REFUND, args, budget) for q, args in queued), return_exceptions=True
            )
        )
        for outcome in outcomes:
            if isinstance(outcome, RedisError):
                # Leaves those limits over-counted until they drain: strict, not lenient, so no retry.
                log.warning("ratelimit_refund_failed", error=type(outcome).__name__)
            elif isinstance(outcome, BaseException):
                raise outcome

    # --- scripts ------------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Connect and load the scripts now, before any request: done by the first check instead, under
        load, that extra work could outlast the caller's budget and look like a slow Redis."""
        await self._ensure_loaded()
        if not self._cluster:
            # Open the hot-path connection too: a no-op batch would cost a round trip, so connect directly.
            pipe = self._pipe(None)
            if pipe.link is None and pipe._connecting is None:
                pipe._connecting = asyncio.get_running_loop().create_task(pipe._connect())
            if pipe._connecting is not None:
                await asyncio.shield(pipe._connecting)

    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load_all())
        loading = self._loading
        try:
            await asyncio.shield(loading)
        finally:
            if loading.done() and self._loading is loading:
                self._loading = None

    async def _load_all(self) -> None:
        # Refunds only happen in a cluster; elsewhere refund.lua is never needed.
        for script in (CHECK, REFUND) if self._cluster else (CHECK,):
            await self._load(script)
        self._loaded = True

    async def _reload(self, generation: int) -> None:
        """NOSCRIPT: load the scripts again, once for all the checks that saw it in the same generation."""
        if generation == self._generation:
            self._loaded = False
        await self._ensure_loaded()
        if generation == self._generation:
            self._generation += 1

    async def _load(self, script: _Script) -> None:
        # A cluster client sends SCRIPT LOAD to every primary.
        sha = await self._client.script_load(script.source)
        self.stats.script_loads += 1
        if sha != script.sha:
            raise RuntimeError(f"{script.name}: Redis hashed it to {sha}, expected {script.sha}")


def _checked(reply: Any, limits: Sequence[Any]) -> Any:
    """The script's reply, if it has the shape of one: anything else is Redis failing (a fallback), never a
    request error, and never read as someone's decision."""
    if not isinstance(reply, list) or len(reply) != len(limits) * FIELDS_OUT:
        raise ResponseError(f"unexpected reply to the rate-limit script: {type(reply).__name__}")
    return reply


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
