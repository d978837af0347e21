"""The rate-limiting interface shared by every backend, the request filter, config and the CLI."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class Limit:
    """One policy applied to one request, values already resolved for this caller.

    Immutable: Policy.limit_for hands the same instance to every request of one caller (its cache), so a
    backend must never change one."""

    policy: str  # policy name (for headers/logs/metrics)
    key: str  # storage key incl. a Redis Cluster hash tag for the identity, e.g. "gw:rl:{c:42}:customer"
    algorithm: Literal["gcra", "quota"]
    limit: int  # gcra: burst (requests allowed at once from idle); quota: requests per window
    rate: float = 0.0  # gcra: requests per `period`
    period: float = 1.0  # gcra: seconds
    window_start: float = 0.0  # quota: epoch seconds of the current calendar window (computed by the caller)
    window_end: float = 0.0  # quota: epoch seconds when the count resets (exclusive)
    cost: int = 1
    shadow: bool = False  # evaluated and counted, never enforced
    # Optional hash (same hash tag as key) of per-team overrides: fields "<policy>:limit" and "<policy>:rate"
    # replace limit/rate when present and valid (limit: a number >= 0, floored; rate: a number > 0).
    override_key: str | None = None
    storage_key: str = field(init=False, repr=False, compare=False)
    """Where the state lives: the GCRA key itself, or one quota counter per window, so a new window starts
    at zero exactly when the caller moves to it (no reset job, no race with expiry). Worked out once."""

    def __post_init__(self) -> None:
        # Bad values would otherwise surface as NaN/inf deep inside Lua, so they fail here, at config time.
        if self.algorithm not in ("gcra", "quota"):
            raise ValueError(f"{self.policy}: unknown algorithm {self.algorithm!r}")
        if self.limit < 0 or self.cost < 1:
            raise ValueError(f"{self.policy}: limit must be >= 0 and cost >= 1")
        if self.algorithm == "gcra" and not (_positive(self.rate) and _positive(self.period)):
            raise ValueError(f"{self.policy}: gcra needs a finite rate > 0 and period > 0")
        if self.algorithm == "quota" and not self.window_end > self.window_start:
            raise ValueError(f"{self.policy}: quota needs window_end > window_start")
        window = "" if self.algorithm == "gcra" else f":{round(self.window_start * 1000)}"
        object.__setattr__(self, "storage_key", self.key + window)


@dataclass(slots=True)
class Decision:
    """One policy's verdict. When another policy rejects the request, an admitting policy still reports its
    own figures (remaining as if admitted), though nothing was consumed.

    Not frozen, for speed (a frozen dataclass's __init__ costs ~4x: one is built per policy per request),
    but treat it as immutable: nothing changes a Decision once made."""

    policy: str
    allowed: bool  # would this policy admit the request (shadow ones too)
    shadow: bool
    limit: int  # effective limit (after override)
    remaining: int  # requests left after this one (0 when rejected)
    reset_after: float  # seconds until the bucket is full again (gcra) / until window_end (quota)
    retry_after: float  # seconds until this request would pass (0.0 when allowed)

    @property
    def enforced_reject(self) -> bool:
        """This decision blocks the request (a shadow policy never does)."""
        return not self.allowed and not self.shadow


class Backend(Protocol):
    async def check(self, limits: Sequence[Limit]) -> list[Decision]:
        """One Decision per Limit, same order; all or nothing (see gateway.ratelimit)."""
        ...

    async def close(self) -> None: ...


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0
