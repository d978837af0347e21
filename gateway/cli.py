"""The `voipbin-gateway` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import structlog

from gateway import __version__, healthcheck, keys_cli, logs, quota_cli, reload_cli
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.demo import command as demo_command
from gateway.pid_file import PidFileError, held
from gateway.reload import ConfigSource, hold_sighup

EXIT_CONFIG_ERROR = 2
EXIT_STARTUP_FAILED = 3  # as supervisor.EXIT_STARTUP_FAILED, which is not imported this early


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voipbin-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"voipbin-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG, else built-in defaults)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="client listener (overrides listen)")
    serve.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listener (overrides admin_listen)")
    serve.add_argument("--upstream", metavar="URL", help="default upstream (overrides upstream.url)")
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes (overrides server.workers)")
    serve.add_argument("--log-format", choices=("json", "console"), help="overrides logging.format")
    serve.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="overrides logging.level"
    )

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG, else built-in defaults)")
    keys_cli.add_commands(commands)
    quota_cli.add_commands(commands)
    healthcheck.add_command(commands)
    reload_cli.add_command(commands)
    demo_command.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "healthcheck":
        return healthcheck.run(args)
    if args.command == "demo":
        return demo_command.run(args, serve=main)
    if args.command in ("keys", "quota"):
        try:
            config = load_config(args.config)  # no preflight: `keys hash` runs before the keys file exists
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        return (keys_cli if args.command == "keys" else quota_cli).run(args, config)
    if args.command == "check-config":
        try:
            config = load_config(args.config)
            _preflight(config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        for warning in _route_warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
        print("ok")
        return 0

    if args.command == "reload":
        return reload_cli.run(args, _preflight)

    hold_sighup()  # before anything else: a reload asked for while starting must not end the process
    source = ConfigSource(
        args.config,
        overrides={
            "listen": args.listen,
            "admin_listen": args.admin_listen,
            "upstream.url": args.upstream,
            "server.workers": args.workers,
            "logging.format": args.log_format,
            "logging.level": args.log_level,
        },
    )
    try:
        config = source.load()
        _preflight(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    logs.configure(config.logging.level, config.logging.format)
    for warning in _route_warnings(config):
        structlog.get_logger("gateway.cli").warning("route_bypass", problem=warning)
    try:
        with held(config.server.pid_file):
            return _serve(config, source)
    except PidFileError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED


def _serve(config: GatewayConfig, source: ConfigSource) -> int:
    from gateway import server, supervisor  # only now: check-config and --version stay light
    from gateway.observability.metrics import MULTIPROC_ENV, wipe_earlier_runs

    if config.server.workers > 1:
        try:
            return supervisor.Supervisor(config, source).run()
        except supervisor.MetricsDirError as exc:
            print(f"cannot start: {exc}", file=sys.stderr)
            return supervisor.EXIT_STARTUP_FAILED
    if metrics_dir := os.environ.get(MULTIPROC_ENV):  # an operator's multiprocess directory, one process
        wipe_earlier_runs(metrics_dir)
    try:
        server.run(config, source=source)
    except OSError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return supervisor.EXIT_STARTUP_FAILED
    return 0


def _route_warnings(config: GatewayConfig) -> list[str]:
    from gateway.route_shadows import route_warnings
    from gateway.routing import compile_routes

    return route_warnings(compile_routes(config))


def _preflight(config: GatewayConfig) -> None:
    from gateway.auth.setup import preflight

    asyncio.run(preflight(config))
