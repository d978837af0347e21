"""Rate limiting core: the limiter math, an in-process backend and a Redis backend with identical semantics.

All or nothing: if any enforced (non-shadow) limit of a request rejects, nothing is consumed from any limit.
Otherwise every limit that admits consumes `cost`; a shadow limit that would reject consumes nothing and
reports allowed=False, shadow=True. GCRA for rates (one small key per client, no window-edge bursts), fixed
calendar-window counts for quotas.
"""

from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.redis_backend import RedisBackend
from gateway.ratelimit.types import Backend, Decision, Limit

__all__ = ["Backend", "Decision", "Limit", "MemoryBackend", "RedisBackend"]
