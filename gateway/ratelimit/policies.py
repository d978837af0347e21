"""Which limits apply to one request: the route's policies, resolved for this caller into `Limit`s.

Pure: config, identity, the client's IP key and a time in; storage keys and values out. Values resolve as
the policy's own, then its plan's (by the identity's plan), then its credential type's; a team's override in
Redis is applied by the backend at evaluation time.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from gateway.auth.identity import Identity
from gateway.config import PolicyConfig, PolicyValues
from gateway.ratelimit.types import Limit

# Parts that name the caller, in the order that picks the Redis Cluster hash tag: every key of one
# identity lives in one slot, so its limits are checked by one script call.
_TAG_ORDER = ("customer", "team", "credential", "ip", "route")
_TAG_PREFIX = {"customer": "c", "team": "t", "credential": "k", "ip": "ip", "route": "r"}
_SAFE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(slots=True)
class Caller:
    """Built per request and stage (not frozen, for speed: a frozen dataclass's __init__ costs ~2x); treat
    as immutable."""

    ip: str | None
    """What per-IP policies count the client under: its address or network (see ip_prefix.IpPrefixes)."""
    identity: Identity | None
    route: str


# Limits resolved per policy and remembered: the same callers come back request after request.
_LIMIT_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    config: PolicyConfig
    zone: ZoneInfo
    # What does not depend on the caller, worked out once: limit_for runs for every policy of every request.
    _tag_part: str = field(init=False)
    _other_parts: tuple[str, ...] = field(init=False)
    _base: list[PolicyConfig | PolicyValues] = field(init=False)
    _parts: Callable[[Caller], tuple[str | None, ...]] = field(init=False, repr=False, compare=False)
    _variants: bool = field(init=False, repr=False, compare=False)
    """Plans or credential types may change the values: the cache key then names the caller's."""
    _resolved: Callable[[tuple[str, ...], int, str | None, str | None], Limit] = field(
        init=False, repr=False, compare=False
    )
    """_resolve behind an LRU cache (emptied when a quota's window changes: its limits name the window)."""
    _window: list[float] = field(init=False, repr=False, compare=False)
    """quota: [local date's ordinal, start, end] of the calendar window the cached limits count in."""

    def __post_init__(self) -> None:
        tag_part = _tag_part(self.config.key)
        object.__setattr__(self, "_tag_part", tag_part)
        object.__setattr__(self, "_other_parts", tuple(p for p in self.config.key if p != tag_part))
        object.__setattr__(self, "_base", [self.config])
        object.__setattr__(self, "_parts", _parts_reader(self.config.key))
        object.__setattr__(self, "_variants", bool(self.config.plans or self.config.by_credential_type))
        object.__setattr__(self, "_resolved", functools.lru_cache(maxsize=_LIMIT_CACHE_SIZE)(self._resolve))
        object.__setattr__(self, "_window", [0.0, 0.0, 0.0])

    @property
    def team_overridable(self) -> bool:
        """`quota set --team` applies to it: its buckets carry the team's hash tag, so the script reads the
        team's override hash from the same Redis Cluster slot. A key that also names the customer is
        tagged by the customer, where a per-team hash cannot follow."""
        return self._tag_part == "team"

    @property
    def limited_by(self) -> str:
        """What the 429's details name: "ip", "customer", "route+customer", ..."""
        return "+".join(self.config.key)

    def limit_for(self, caller: Caller, now: float, cost: int) -> Limit | None:
        """This policy's limit for the caller, or None when the caller lacks a part of the key (a customer
        policy on an anonymous request does not apply).

        A Limit depends only on the key's values, the cost, the caller's plan and credential type where the
        policy has values for them, and (quota) the calendar window of `now`: it is resolved once for those
        and handed out again (Limits are immutable)."""
        values = self._parts(caller)
        if None in values:
            return None
        identity = caller.identity
        plan = credential_type = None
        if self._variants and identity is not None:
            config = self.config
            if identity.plan in config.plans:
                plan = identity.plan
            if identity.credential_type in config.by_credential_type:
                credential_type = identity.credential_type
        if self.config.algorithm != "gcra":
            # calendar_window depends on nothing but the local date (a fraction of its cost to read). Not
            # on [start, end) containing now: around some DST changes windows overlap (America/Goose_Bay's
            # fall-back at 00:01 until 2011 repeated the previous day's last hour).
            window = self._window
            day = datetime.fromtimestamp(now, self.zone).toordinal()
            if day != window[0]:
                assert self.config.window is not None
                window[:] = [day, *calendar_window(now, self.config.window, self.zone)]
                self._resolved.cache_clear()  # type: ignore[attr-defined]
        return self._resolved(values, cost, plan, credential_type)  # type: ignore[arg-type]

    def _resolve(
        self, key_values: tuple[str, ...], cost: int, plan: str | None, credential_type: str | None
    ) -> Limit:
        """The Limit for these key part values and cost, with the values of `plan` and `credential_type`
        (None: the caller has none this policy names)."""
        config = self.config
        parts = dict(zip(config.key, key_values, strict=True))
        values = self._base
        if plan is not None or credential_type is not None:
            values = [config]
            if plan is not None:
                values.append(config.plans[plan])
            if credential_type is not None:
                values.append(config.by_credential_type[credential_type])
        own_bucket = credential_type is not None
        tag_part = self._tag_part
        tag = f"{_TAG_PREFIX[tag_part]}:{_key_text(tag_part, parts[tag_part])}"
        rest = [f"{p}={_key_text(p, parts[p])}" for p in self._other_parts]
        if own_bucket:
            rest.append(f"type={_safe(credential_type)}")
        key = ":".join([f"gw:rl:{{{tag}}}", self.name, *rest])
        override = team_override_key(parts["team"]) if tag_part == "team" else None
        if config.algorithm == "gcra":
            return Limit(
                policy=self.name,
                key=key,
                algorithm="gcra",
                limit=int(_pick(values, "burst")),
                rate=float(_pick(values, "rate")),
                period=config.period,
                cost=cost,
                shadow=config.shadow,
                override_key=override,
            )
        assert config.window is not None
        _, start, end = self._window
        return Limit(
            policy=self.name,
            key=key,
            algorithm="quota",
            limit=int(_pick(values, "limit")),
            window_start=start,
            window_end=end,
            cost=cost,
            shadow=config.shadow,
            override_key=override,
        )


def team_override_key(team_id: str | None) -> str:
    """The Redis hash of a team's overrides (`quota set`), in the same slot as the team's buckets."""
    return f"gw:rl:{{{_TAG_PREFIX['team']}:{_safe(team_id)}}}:override"


def compile_policies(policies: dict[str, PolicyConfig]) -> dict[str, Policy]:
    return {name: Policy(name, config, ZoneInfo(config.timezone)) for name, config in policies.items()}


def calendar_window(now: float, window: str, zone: ZoneInfo) -> tuple[float, float]:
    """[start, end) of the day or month containing `now`, in `zone` (DST-aware: a day may be 23 or 25 h).

    Every instance computes this from its own clock and the count's key names the window start, so
    instances whose clocks disagree near a boundary count in different windows (README: keep clocks in
    sync)."""
    local = datetime.fromtimestamp(now, zone)
    # fold=0: an instant in a repeated hour (fold=1) would otherwise make the boundary midnight its second
    # occurrence, as if the repeated hour were a window of its own. Where midnight is skipped (clocks jump
    # from 00:00), fold=0 resolves it to the jump itself, so the boundaries of adjacent windows still meet.
    start = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    if window == "day":
        following = start + timedelta(days=1)
    else:
        start = start.replace(day=1)
        following = (start + timedelta(days=32)).replace(day=1)
    # Aware arithmetic is wall-clock arithmetic; timestamp() then applies each boundary's own UTC offset.
    return start.timestamp(), following.timestamp()


def _tag_part(key: tuple[str, ...]) -> str:
    return next(part for part in _TAG_ORDER if part in key)


def _parts_reader(key: tuple[str, ...]) -> Callable[[Caller], tuple[str | None, ...]]:
    """caller -> the values of the key's parts, in key order (None for a part the caller lacks)."""
    if key == ("ip",):
        return lambda caller: (caller.ip,)
    if key == ("customer",):
        return lambda caller: (None if caller.identity is None else caller.identity.customer_id,)
    return lambda caller: tuple([_part_value(part, caller) for part in key])


def _part_value(part: str, caller: Caller) -> str | None:
    identity = caller.identity
    if part == "ip":
        return caller.ip
    if part == "route":
        return caller.route
    if identity is None:
        return None
    if part == "customer":
        return identity.customer_id
    if part == "team":
        return identity.team_id
    return identity.credential_id


@functools.lru_cache(maxsize=4096)  # the same IPs, customers and teams come back request after request
def _safe(value: str | None) -> str:
    """Values go into Redis keys: braces would break the hash tag, so anything unusual is hashed."""
    assert value is not None
    return value if _SAFE.fullmatch(value) else hashlib.sha256(value.encode()).hexdigest()[:24]


def _key_text(part: str, value: str | None) -> str:
    """How a key part's value is written: an IP network as IpPrefixes writes it (2001:db8:1:2::/64) stays
    readable; an id is `_safe`, so one with a "/" keeps the hashed key (and `quota set` override) it had."""
    if part == "ip" and value is not None and _is_network(value):
        return value
    return _safe(value)


@functools.lru_cache(maxsize=4096)
def _is_network(value: str) -> bool:
    if "/" not in value:
        return False
    try:
        return str(ipaddress.ip_network(value)) == value
    except ValueError:
        return False


def _pick(values: list[PolicyConfig | PolicyValues], name: str) -> float:
    """The last source in the resolution order that sets `name`."""
    for source in reversed(values):
        value = getattr(source, name)
        if value is not None:
            return float(value)
    raise AssertionError(f"policy value {name} unset (the config validator requires it)")
