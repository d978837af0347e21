"""The one place that turns `redis.url` into a client, so every user of Redis fails the same, fast way.

- `redis://`, `rediss://` (TLS), `unix://`: one server.
- `redis+cluster://host:port[,host:port...]` (or `rediss+cluster://`): a Redis Cluster, from startup nodes.
- `redis+sentinel://host:port[,host:port...]/<service>[/<db>]` (or `rediss+sentinel://`): the master Sentinel
  names for the service, followed across failovers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

CONNECT_TIMEOUT = 1.0
SOCKET_TIMEOUT = 1.0
# Idle pooled connections are PINGed before reuse after this long, so a Redis restart costs no request.
HEALTH_CHECK_INTERVAL = 15

Client = redis.asyncio.Redis | redis.asyncio.RedisCluster


def _options() -> dict[str, Any]:
    # Requests wait on Redis, so a down or stalled server must fail within about two seconds, not redis-py's
    # five-second timeouts. from_url() does not apply the Redis() constructor's default retry policy, so the
    # single retry here (for a pooled connection the server dropped) is explicit.
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1),
        "decode_responses": True,
    }


def _nodes(netloc: str) -> list[tuple[str, int]]:
    hosts = netloc.rpartition("@")[2]
    out = []
    for node in hosts.split(","):
        host, _, port = node.rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def connect(url: str) -> Client:
    scheme, _, _ = url.partition("://")
    if scheme in ("redis+cluster", "rediss+cluster"):
        parts = urlsplit(url)
        return redis.asyncio.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in _nodes(parts.netloc)],
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=scheme.startswith("rediss"),
            **_options(),
        )
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        parts = urlsplit(url)
        service, _, db = parts.path.strip("/").partition("/")
        options = {
            **_options(),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "ssl": scheme.startswith("rediss"),
        }
        sentinels = _nodes(parts.netloc)
        sentinel = Sentinel(sentinels, sentinel_kwargs={"socket_timeout": SOCKET_TIMEOUT}, **options)
        return sentinel.master_for(service, db=int(db or 0))
    return redis.asyncio.from_url(url, health_check_interval=HEALTH_CHECK_INTERVAL, **_options())
