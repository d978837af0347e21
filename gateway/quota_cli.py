"""`voipbin-gateway quota show|reset|set|unset`: a team's or a customer's limits, read from (and changed in)
the Redis every gateway instance shares."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from datetime import UTC, datetime
from typing import Any

from gateway.auth.identity import Identity
from gateway.config import GatewayConfig
from gateway.ratelimit.algorithms import effective
from gateway.ratelimit.policies import Caller, Policy, compile_policies, team_override_key
from gateway.ratelimit.types import Limit

# A credential type no policy lists, so the lookup lands in the policy's shared bucket.
_DEFAULT_BUCKET = "-"


def add_commands(subparsers: Any) -> None:
    quota = subparsers.add_parser(
        "quota", help="show, reset or override a team's or customer's limits (Redis)"
    )
    commands = quota.add_subparsers(dest="quota_command", metavar="COMMAND", required=True)
    for name, text in (
        ("show", "usage, remaining and reset of every policy"),
        ("reset", "start counting anew"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", help="YAML config file")
        who = command.add_mutually_exclusive_group(required=True)
        who.add_argument("--team")
        who.add_argument("--customer")
        if name == "reset":
            command.add_argument("--policy", help="only this policy (default: all)")
    for name, text in (
        ("set", "override a policy's limit or rate for one team"),
        ("unset", "drop overrides"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", help="YAML config file")
        command.add_argument("--team", required=True)
        command.add_argument("--policy", required=True)
        if name == "set":
            value = command.add_mutually_exclusive_group(required=True)
            value.add_argument("--limit", type=int, help="burst (gcra) or requests per window (quota)")
            value.add_argument("--rate", type=float, help="gcra: requests per period")


def run(args: argparse.Namespace, config: GatewayConfig) -> int:
    if config.redis.url is None:
        print("error: redis.url is not set; quotas are shared through Redis", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_run(args, config))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as exc:
        print(f"error: Redis is not reachable: {type(exc).__name__}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, config: GatewayConfig) -> int:
    from redis.exceptions import RedisError

    from gateway import redis_client

    policies = compile_policies(config.rate_limit.policies)
    client = redis_client.connect(config.redis.url or "")
    try:
        if args.quota_command == "show":
            finer = _finer_team_policies(policies) if args.team else []
            await _show(client, _buckets(policies, args.team, args.customer), args.team, finer)
        elif args.quota_command == "reset":
            buckets = _buckets(policies, args.team, args.customer, only=args.policy)
            removed = await client.delete(*[lim.storage_key for _, lim in buckets]) if buckets else 0
            print(f"reset {len(buckets)} bucket(s) ({removed} had state)")
        else:
            await _override(client, policies, args)
        return 0
    except RedisError as exc:
        print(f"error: Redis: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()


def _buckets(
    policies: dict[str, Policy], team: str | None, customer: str | None, only: str | None = None
) -> list[tuple[str, Limit]]:
    """(bucket name, limit) for every policy counted by this team or customer alone."""
    part = "team" if team else "customer"
    if only is not None and only not in policies:
        raise ValueError(f"no policy {only!r}; defined: {', '.join(sorted(policies))}")
    now = datetime.now(UTC).timestamp()
    out = []
    for policy in policies.values():
        if policy.config.key != (part,) or (only is not None and policy.name != only):
            continue
        for bucket in (_DEFAULT_BUCKET, *policy.config.by_credential_type):
            identity = Identity(credential_type=bucket, team_id=team, customer_id=customer)
            limit = policy.limit_for(Caller(None, identity, ""), now, 1)
            if limit is not None:
                out.append(("default" if bucket == _DEFAULT_BUCKET else bucket, limit))
    return out


def _finer_team_policies(policies: dict[str, Policy]) -> list[Policy]:
    """Policies the team's overrides apply to that count per team and something else (a route, an IP):
    too many buckets to list, but `show` still names their overrides, as `set` accepts them."""
    return [p for p in policies.values() if p.team_overridable and p.config.key != ("team",)]


async def _show(client: Any, buckets: list[tuple[str, Limit]], team: str | None, finer: list[Policy]) -> None:
    seconds, micros = await client.time()
    now = int(seconds) + int(micros) / 1e6
    rows = [("POLICY", "BUCKET", "LIMIT", "REMAINING", "RESETS (UTC)", "OVERRIDE")]
    overrides: dict[str, str] = await client.hgetall(team_override_key(team)) if team else {}
    for bucket, lim in buckets:
        raw = await client.get(lim.storage_key)
        limit, rate = effective(lim, lambda _key, field: overrides.get(field))
        state = None if raw is None else float(raw)
        if lim.algorithm == "gcra":
            interval = lim.period / rate
            tat = max(state or now, now)
            remaining = max(0, math.floor((limit * interval - (tat - now)) / interval + 1e-9))
            resets = tat
        else:
            remaining = max(0, limit - int(state or 0))
            resets = lim.window_end
        when = datetime.fromtimestamp(resets, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        shown = _overrides_of(lim.policy, overrides)
        rows.append((lim.policy, bucket, str(limit), str(remaining), when, shown))
    for policy in finer:
        per = "+".join(part for part in policy.config.key if part != "team")
        rows.append((policy.name, f"per {per}", "-", "-", "-", _overrides_of(policy.name, overrides)))
    if len(rows) == 1:
        print("no policy is counted by this team or customer alone")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _overrides_of(policy: str, overrides: dict[str, str]) -> str:
    mine = {k.split(":", 1)[1]: v for k, v in overrides.items() if k.startswith(f"{policy}:")}
    return ", ".join(f"{k}={v}" for k, v in sorted(mine.items())) or "-"


async def _override(client: Any, policies: dict[str, Policy], args: argparse.Namespace) -> None:
    policy = policies.get(args.policy)
    if policy is None or "team" not in policy.config.key:
        team_policies = sorted(name for name, p in policies.items() if "team" in p.config.key)
        raise ValueError(
            f"{args.policy!r} is not a team policy; team policies: {', '.join(team_policies) or 'none'}"
        )
    if args.quota_command == "set" and not policy.team_overridable:
        usable = sorted(name for name, p in policies.items() if p.team_overridable)
        raise ValueError(
            f"{policy.name!r} is keyed by [{', '.join(policy.config.key)}]: it counts per customer, so a "
            "team override cannot apply to it; team overrides apply to policies keyed by team without "
            f"customer: {', '.join(usable) or 'none defined'}"
        )
    key = team_override_key(args.team)
    if args.quota_command == "unset":  # any team policy: also clears what an older CLI set in vain
        await client.hdel(key, f"{policy.name}:limit", f"{policy.name}:rate")
        print(f"overrides of {policy.name} removed for team {args.team}")
        return
    if args.rate is not None and policy.config.algorithm != "gcra":
        raise ValueError(f"{policy.name} is a quota: set --limit, not --rate")
    field, value = ("limit", args.limit) if args.limit is not None else ("rate", args.rate)
    if value is None or value < 0 or (field == "rate" and value == 0):
        raise ValueError(f"--{field} must be positive")
    await client.hset(key, f"{policy.name}:{field}", str(value))
    print(f"{policy.name}: {field}={value} for team {args.team}")
