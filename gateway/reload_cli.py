"""`voipbin-gateway reload`: check the config as the running gateway will, then ask it to apply it (SIGHUP).

The running process checks again and logs `config_reloaded` or `config_reload_failed`; checking here first
means a mistake is shown to whoever made it, with check-config's messages, and nothing is signalled.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.pid_file import PidFileError, read


def add_command(commands: Any) -> None:
    reload = commands.add_parser(
        "reload",
        help="check the config, then have the running gateway apply it (SIGHUP)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reload.add_argument(
        "--config", help="YAML config file (default: $GATEWAY_CONFIG, else built-in defaults)"
    )
    target = reload.add_mutually_exclusive_group()
    target.add_argument("--pid-file", help="the running gateway's pid file (default: server.pid_file)")
    target.add_argument("--pid", type=_process_id, help="the running gateway's process id")


def run(args: argparse.Namespace, preflight: Callable[[GatewayConfig], None]) -> int:
    try:
        config = load_config(args.config)
        preflight(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print("not reloaded: the running gateway keeps its config", file=sys.stderr)
        return 1
    try:
        pid = args.pid if args.pid is not None else read(_pid_file(args, config))
    except PidFileError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"no process {pid}: is the gateway running?", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"not allowed to signal process {pid}: run as the gateway's user", file=sys.stderr)
        return 1
    print(f"reload requested from process {pid}; its log says config_reloaded or config_reload_failed")
    return 0


def _process_id(text: str) -> int:
    # os.kill(0 or a negative number) would signal a whole process group, or every process we may signal.
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id (a whole number from 1)")
    return int(text)


def _pid_file(args: argparse.Namespace, config: GatewayConfig) -> str:
    path = args.pid_file or config.server.pid_file
    if path is None:
        raise PidFileError("no pid file: set server.pid_file, or pass --pid-file or --pid")
    return str(path)
