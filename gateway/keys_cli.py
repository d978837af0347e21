"""`voipbin-gateway keys`: issue, list and revoke the access keys the gateway itself owns.

`create`, `list` and `revoke` work on the Redis store (redis.url); `hash` makes a key for the keys file.
A key is printed once, when it is made: stores keep only its peppered hash.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI module stays light: redis and the stores load only when a command runs
    from gateway.auth.access_keys import KeyRecord
    from gateway.config import GatewayConfig

_CONFIG_HELP = "YAML config file (default: $GATEWAY_CONFIG, else built-in defaults)"


class _Failure(Exception):
    """A reason the command cannot do its work, for one line on stderr."""


def add_commands(subparsers: Any) -> None:
    """Add `keys` and its subcommands to the `voipbin-gateway` parser's subparsers."""
    # --config sits on each leaf: a default on both `keys` and a leaf would let the leaf's None win.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=_CONFIG_HELP)
    key_options = argparse.ArgumentParser(add_help=False, parents=[common])
    key_options.add_argument("--customer", required=True, metavar="ID", help="customer id the key acts for")
    key_options.add_argument("--team", metavar="ID", help="team id (optional)")
    key_options.add_argument("--name", help="a label for people, shown by `keys list`")
    key_options.add_argument("--expires", metavar="DURATION", help="lifetime such as 30d, 12h, 15m, 3600s")
    key_options.add_argument(
        "--plan", metavar="NAME", help="plan whose values rate-limit policies apply (their `plans:`)"
    )

    keys = subparsers.add_parser("keys", help="issue, list and revoke the gateway's own access keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    actions.add_parser("create", parents=[key_options], help="create a key in Redis and print it once")
    actions.add_parser("list", parents=[common], help="list the keys in Redis (never the keys themselves)")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key in Redis by its id")
    revoke.add_argument("id", help="the key's id, as printed by `keys create` or `keys list`")
    actions.add_parser(
        "hash", parents=[key_options], help="make a key for the keys file: print it once and its YAML entry"
    )


def run(args: argparse.Namespace, config: GatewayConfig, environ: Mapping[str, str] = os.environ) -> int:
    from redis.exceptions import RedisError

    try:
        if args.keys_command == "hash":
            return _hash(args, config, environ)
        return asyncio.run(_redis_command(args, config, environ))
    except (_Failure, ValueError) as exc:
        _error(str(exc))
    except (RedisError, OSError) as exc:
        _error(f"Redis at {_redacted(config.redis.url or '')}: {exc}")
    return 1


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """`python -m gateway.keys_cli keys ...`: the same commands without the rest of the CLI."""
    from gateway.config import ConfigError, load_config

    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="voipbin-gateway")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, environ=environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    return run(args, config, environ)


async def _redis_command(args: argparse.Namespace, config: GatewayConfig, environ: Mapping[str, str]) -> int:
    from gateway import redis_client
    from gateway.auth.key_stores import RedisKeyStore, load_pepper

    if config.redis.url is None:
        raise _Failure(
            "redis.url is not set; `keys create/list/revoke` keep keys in Redis "
            "(`keys hash` makes keys for the keys file)"
        )
    creating = args.keys_command == "create"
    pepper = load_pepper(config.auth.access_keys, environ) if creating else None
    expires_in = _expires_in(args) if creating else None
    client = redis_client.connect(config.redis.url)
    try:
        store = RedisKeyStore(client, pepper, prefix=config.auth.access_keys.prefix)
        if creating:
            key, record = await store.create(args.customer, args.team, args.name, expires_in, args.plan)
            _print_new_key(key, record.id, record.expires_at)
        elif args.keys_command == "list":
            _print_table(await store.list())
        else:
            revoked = await store.revoke(args.id)
            if revoked is None:
                raise _Failure(f"no key with id {args.id!r}")
            print(f"revoked {revoked.id} at {_when(revoked.revoked_at)}")
        return 0
    finally:
        await client.aclose()


def _hash(args: argparse.Namespace, config: GatewayConfig, environ: Mapping[str, str]) -> int:
    import yaml

    from gateway.auth.access_keys import generate_id, generate_key, key_hash
    from gateway.auth.key_stores import load_pepper

    settings = config.auth.access_keys
    pepper = load_pepper(settings, environ)
    expires_in = _expires_in(args)
    now = int(time.time())
    key = generate_key(settings.prefix)
    entry = {
        "id": generate_id(),
        "hash": key_hash(key, pepper),
        "customer_id": args.customer,
        "team_id": args.team or None,
        "name": args.name or None,
        "plan": args.plan or None,
        "created_at": now,
        "expires_at": None if expires_in is None else now + int(expires_in),
        "revoked_at": None,
    }
    _print_new_key(key, entry["id"], entry["expires_at"])
    print()
    print(f"# Add this entry under `keys:` in {settings.file or 'the keys file (auth.access_keys.file)'}:")
    print(yaml.safe_dump([entry], sort_keys=False), end="")
    return 0


def _expires_in(args: argparse.Namespace) -> float | None:
    from gateway.auth.access_keys import parse_duration

    if not args.expires:
        return None
    try:
        return parse_duration(args.expires)
    except ValueError as exc:
        raise _Failure(f"--expires: {exc}") from None


def _print_new_key(key: str, key_id: str, expires_at: float | None) -> None:
    print(f"key: {key}")
    print(f"id: {key_id}")
    print(f"expires: {_when(expires_at) or 'never'}")
    print("Store the key now: it is shown only this once.", file=sys.stderr)


def _print_table(records: Sequence[KeyRecord]) -> None:
    header = ("ID", "CUSTOMER", "TEAM", "NAME", "PLAN", "CREATED", "EXPIRES", "REVOKED")
    rows = [
        (
            r.id,
            r.customer_id,
            r.team_id or "-",
            r.name or "-",
            r.plan or "-",
            _when(r.created_at),
            _when(r.expires_at) or "never",
            _when(r.revoked_at) or "-",
        )
        for r in records
    ]
    rows = [tuple(_printable(cell) for cell in row) for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _printable(text: str) -> str:
    # A name with a newline or escape sequence must not forge rows in the table.
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _redacted(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
