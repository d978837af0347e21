"""`voipbin-gateway demo` and `voipbin-gateway demo token`.

`demo` binds the stand-in upstream first (so the gateway's first reachability probe finds it and /readyz
says ready at once), then runs exactly what `voipbin-gateway serve --config config/demo.yaml --upstream
<stand-in>` runs, in the same process; SIGINT or SIGTERM drains the gateway, then the stand-in stops.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.auth.identity import is_identifier_text
from gateway.config import parse_listen
from gateway.demo.data import DEMO_CUSTOMER_ID

DEFAULT_CONFIG = "config/demo.yaml"
DEFAULT_UPSTREAM_LISTEN = "127.0.0.1:9000"  # config/demo.yaml's upstream.url, for `serve` beside a stand-in
EXIT_CONFIG_ERROR = 2  # gateway.cli's, which imports this module
_CONFIG_HELP = f"YAML config file, relative paths from the working directory (default: {DEFAULT_CONFIG})"


def add_commands(subparsers: Any) -> None:
    """Add `demo` and `demo token` to the `voipbin-gateway` parser's subparsers."""
    demo = subparsers.add_parser(
        "demo",
        help="run a stand-in VoIPBIN API and the gateway in front of it, offline (no account needed)",
        description="Run from the repository root; Ctrl-C stops both. `demo token` prints a JWT it accepts.",
    )
    demo.add_argument("--config", default=DEFAULT_CONFIG, help=_CONFIG_HELP)
    demo.add_argument("--listen", metavar="HOST:PORT", help="client listener (overrides listen)")
    demo.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listener (overrides admin_listen)")
    demo.add_argument(
        "--upstream-listen",
        metavar="HOST:PORT",
        type=_address,
        default=DEFAULT_UPSTREAM_LISTEN,
        help=f"the stand-in upstream, which the gateway forwards to (default: {DEFAULT_UPSTREAM_LISTEN})",
    )
    actions = demo.add_subparsers(dest="demo_command", metavar="COMMAND")
    token = actions.add_parser("token", help="print a JWT (HS256, the demo secret) that the demo accepts")
    # SUPPRESS: without --config here, the one given before `token` (or demo's default) stays.
    token.add_argument("--config", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    token.add_argument(
        "--customer",
        type=_identifier,
        default=DEMO_CUSTOMER_ID,
        metavar="ID",
        help="customer id (default: the demo's)",
    )
    token.add_argument("--team", type=_identifier, metavar="ID", help="team id (optional)")
    token.add_argument("--expires", default="24h", metavar="DURATION", help="lifetime such as 24h, 15m, 7d")


def run(args: argparse.Namespace, serve: Callable[[Sequence[str]], int]) -> int:
    """`serve` is the CLI's own entry (gateway.cli.main), given an argument list."""
    token = args.demo_command == "token"
    if not Path(args.config).is_file():
        # The likeliest cause by far: a newcomer outside the clone, where the relative default means nothing.
        print(
            f"error: no file {args.config}: run this in the repository root, or pass --config",
            file=sys.stderr,
        )
        return 1 if token else EXIT_CONFIG_ERROR  # as `keys` and `serve` exit for a config they cannot read
    if token:
        return _token(args)
    return _demo(args, serve)


def _demo(args: argparse.Namespace, serve: Callable[[Sequence[str]], int]) -> int:
    from gateway.demo import upstream
    from gateway.server import bind
    from gateway.supervisor import EXIT_STARTUP_FAILED

    try:
        sock = bind(args.upstream_listen, reuse_port=False)
    except OSError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    host, _ = parse_listen(args.upstream_listen)
    port = sock.getsockname()[1]  # the one bound, also for port 0
    upstream_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    argv = ["serve", "--config", args.config, "--upstream", upstream_url]
    for option, value in (("--listen", args.listen), ("--admin-listen", args.admin_listen)):
        if value is not None:
            argv += [option, value]
    with upstream.serving(sock):
        print(
            f"demo: stand-in VoIPBIN API on {upstream_url} (canned data, gateway/demo/upstream.py); "
            f"starting the gateway with {args.config} in front of it. Ctrl-C stops both.",
            file=sys.stderr,
        )
        return serve(argv)


def _token(args: argparse.Namespace) -> int:
    from gateway.auth.access_keys import parse_duration
    from gateway.config import ConfigError, load_config
    from gateway.demo.token import agent_claims, mint

    try:
        lifetime = parse_duration(args.expires)
    except ValueError as exc:
        print(f"error: --expires: {exc}", file=sys.stderr)
        return 1
    try:
        config = load_config(args.config)
        print(mint(config, agent_claims(args.customer, args.team, now=time.time(), lifetime=lifetime)))
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _address(value: str) -> str:
    try:
        parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _identifier(value: str) -> str:
    # The gateway refuses a token whose identifiers would not fit in a header to the upstream.
    if not value or not is_identifier_text(value):
        raise argparse.ArgumentTypeError("must be non-empty printable ASCII")
    return value
