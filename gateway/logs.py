"""Structured logging: structlog for our own events, the standard library's loggers (aiohttp, asyncio)
routed through the same renderer, so every line on stdout is one JSON object (or a readable console line)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure(level: str = "info", fmt: str = "json") -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt == "console":
        # plain_traceback never prints frame locals (rich's formatter would, credentials included)
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    tail: list[structlog.types.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        renderer,
    ]
    if fmt != "console":
        # Frame locals hold raw query strings, headers and credentials: tracebacks without them.
        tail.insert(0, structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)))

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=tail))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # aiohttp's access log would write raw query strings, and with them ?accesskey= and ?token= values.
    logging.getLogger("aiohttp.access").disabled = True

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )


class _Stdout:
    """stdout (or its byte buffer), looked up at each write rather than once: whoever swaps sys.stdout
    later (a process manager's redirect, a test's capture) still gets the lines, never a closed old one."""

    def __init__(self, *, binary: bool) -> None:
        self._binary = binary

    def write(self, data: Any) -> int:
        return (sys.stdout.buffer if self._binary else sys.stdout).write(data)

    def flush(self) -> None:
        sys.stdout.flush()


def access_logger(fmt: str = "json") -> structlog.typing.FilteringBoundLogger:
    """The access log's own logger. It runs once per request, so it skips the standard library: the
    shortest processor chain, rendered by orjson straight to stdout's byte buffer."""
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    context = structlog.contextvars.merge_contextvars  # the worker's index, when there are workers
    if fmt == "console":
        logger = structlog.wrap_logger(
            structlog.PrintLogger(_Stdout(binary=False)),  # type: ignore[arg-type]
            processors=[context, stamp, structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        )
    else:
        logger = structlog.wrap_logger(
            structlog.BytesLogger(_Stdout(binary=True)),  # type: ignore[arg-type]
            processors=[context, stamp, structlog.processors.JSONRenderer(serializer=orjson.dumps)],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        )
    return logger.bind(logger="gateway.access", level="info")
