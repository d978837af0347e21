"""Structured logging: structlog for our own events, the standard library's loggers (aiohttp, asyncio)
routed through the same renderer, so every line on stdout is one JSON object (or a readable console line).

The access log (one line per request) is buffered and written once per event-loop tick (`ACCESS`):
- Whole lines: each write(2) carries complete lines only, at most PIPE_BUF (4096) bytes of them, so lines of
  worker processes sharing one stdout pipe never interleave (POSIX makes such pipe writes atomic). A single
  line longer than that (a very long redacted path) goes out alone in one write, which a pipe may split.
  To a regular file (which Linux writes whole per write(2)) a tick's lines go out in one write.
- Bounded by blocking, not by dropping: stdout stays a blocking descriptor (it is shared with the other
  loggers and the other workers), so a slow reader stalls this process at the flush, as each line's own
  write did before; the buffer holds at most one tick's lines, and is written at once past _MAX_BUFFERED.
  Lines are lost only when stdout itself is gone (closed, broken pipe): counted in `ACCESS.lost`.
- Ordered: any other log line (the standard library's handler, so every structlog event too) first writes
  out the access lines before it; outside a running event loop lines are written at once.
- Never lost on a clean exit: the loop's callback flushes each tick, `server.serve` flushes after the drain,
  and an atexit hook flushes whatever a later step (or an exit path without the loop) left.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import logging
import os
import select
import stat
import sys
import threading
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

    handler = _Handler(sys.stdout)
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


_MAX_BUFFERED = 256 * 1024
"""Bytes of access lines after which they are written within the tick (a burst must not grow the buffer)."""
_PIPE_BUF = getattr(select, "PIPE_BUF", 4096)


class AccessBuffer:
    """Access-log lines of this process, written to stdout once per event-loop tick (module docstring).

    Lines are appended on the loop's thread; the flush (the tick's callback, another log line, exit) may run
    on any thread, under a lock."""

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._size = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._scheduled = False
        # Reentrant: a line logged while a flush holds it (a finalizer run by the garbage collector, say)
        # flushes again through _Handler on the same thread.
        self._lock = threading.RLock()
        self.lost = 0
        """Lines dropped because stdout could not be written at all (closed, broken pipe)."""

    def write(self, line: bytes) -> None:
        """Queue one complete line (ending in a newline)."""
        self._lines.append(line)
        self._size += len(line)
        if self._size >= _MAX_BUFFERED:
            self.flush()
            return
        loop = self._loop
        # The loop that runs in this thread now, without asyncio.get_running_loop() per line (on 3.11 a
        # getpid(2) each): only one loop runs in a thread at a time.
        if loop is not None and self._thread == threading.get_ident() and loop.is_running():
            if self._scheduled:
                return
        else:
            loop = self._loop = asyncio._get_running_loop()
            self._thread = threading.get_ident()
            if loop is None:  # no event loop (a command, a test): written at once
                self.flush()
                return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            if not self._lines:
                return
            lines, self._lines, self._size = self._lines, [], 0
            try:
                _write_lines(lines)
            except (OSError, ValueError):  # stdout closed or its reader gone: nothing can be written there
                self.lost += len(lines)


def _write_lines(lines: list[bytes]) -> None:
    out = sys.stdout  # looked up at each flush: a later redirect or a test's capture still gets the lines
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # a capture object without a descriptor
        data = b"".join(lines)
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            buffer.write(data)
        else:
            out.write(data.decode())
        out.flush()
        return
    out.flush()  # anything print() left in stdout's own buffer goes first
    if _regular_file(fd):  # one write of any size is never interleaved with another writer's there
        _write_all(fd, b"".join(lines))
        return
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > _PIPE_BUF:
            _write_all(fd, b"".join(chunk))
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    _write_all(fd, b"".join(chunk))


_regular: tuple[int, int, bool] = (-1, -1, False)


def _regular_file(fd: int) -> bool:
    """Whether `fd` is a regular file, where Linux writes each write(2) whole under the inode's lock: the
    PIPE_BUF bound is for pipes, sockets and terminals. Asked once per descriptor and stdout object."""
    global _regular
    fd_seen, stdout_seen, regular = _regular
    if fd_seen != fd or stdout_seen != id(sys.stdout):
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        _regular = (fd, id(sys.stdout), regular)
    return regular


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:  # someone made stdout non-blocking: block here all the same
            select.select([], [fd], [])
            continue
        view = view[written:]


ACCESS = AccessBuffer()
atexit.register(ACCESS.flush)


def flush_access_log() -> None:
    ACCESS.flush()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's handler, which first writes out the access lines logged before its record."""

    def emit(self, record: logging.LogRecord) -> None:
        if ACCESS._lines:
            ACCESS.flush()
        super().emit(record)


class JsonAccessLog:
    """The access log in JSON: one orjson call per line, no processor chain. Each line carries `logger`,
    `level`, the fields given, `event`, the structlog context variables bound when this logger was made (the
    worker's index, with workers) and a UTC ISO-8601 `timestamp`, as structlog's TimeStamper writes it.

    Hand-written rather than structlog's BytesLogger with merge_contextvars, TimeStamper and JSONRenderer
    (what the other loggers use) because it runs once per request: timed with the gateway's 21 access-log
    fields, that chain took ~15 µs per line and this ~7 µs on the 2-core development box, on a path whose
    whole budget is a few hundred µs (issue "Fast path", and its closing note). The line is the same."""

    def __init__(self, sink: AccessBuffer) -> None:
        self._write = sink.write
        self._context = structlog.contextvars.get_contextvars()

    def info(self, event: str, **fields: Any) -> None:
        line = {
            "logger": "gateway.access",
            "level": "info",
            **fields,
            "event": event,
            **self._context,
            "timestamp": _now(_UTC),
        }
        self._write(orjson.dumps(line, default=repr, option=_ORJSON_OPTIONS))


_ORJSON_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE
_now = datetime.datetime.now
_UTC = datetime.UTC


class _BufferedText:
    """structlog's final step for the console format: the rendered line into the access buffer."""

    def __init__(self, sink: AccessBuffer) -> None:
        self._write = sink.write

    def info(self, message: str) -> None:
        self._write(message.encode("utf-8", "replace") + b"\n")

    msg = info


def access_logger(fmt: str = "json") -> Any:
    """The access log's own logger, with an `info(event, **fields)` method. It runs once per request, so it
    skips the standard library and writes into the per-tick buffer (module docstring)."""
    if fmt != "console":
        return JsonAccessLog(ACCESS)
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    context = structlog.contextvars.merge_contextvars  # the worker's index, when there are workers
    logger = structlog.wrap_logger(
        _BufferedText(ACCESS),
        processors=[context, stamp, structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    return logger.bind(logger="gateway.access", level="info")
