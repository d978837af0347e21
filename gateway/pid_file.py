"""server.pid_file: which process `voipbin-gateway reload` signals.

The file is locked (flock) for as long as its gateway runs, and the lock goes with the process however it
ends. So a second gateway given the same file refuses to start instead of taking it over, and `reload`
tells a live gateway's file from one a crashed gateway left behind, whose process id may by now be another
program's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


class PidFileError(Exception):
    """The pid file cannot be used; the message names the file and what to do."""


@contextlib.contextmanager
def held(path: str | None) -> Iterator[None]:
    """This process's id in `path`, locked, while the block runs (nothing when None); removed after it."""
    if path is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise PidFileError(f"server.pid_file = {path!r}: cannot be written: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PidFileError(
                f"server.pid_file = {path!r}: another gateway (process {_text(fd) or '?'}) runs with it; "
                "stop that one first, or give this one a pid file of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still our file, not one put in its place
                    os.unlink(path)
    finally:
        os.close(fd)


def read(path: str) -> int:
    """The process id of the gateway running with this pid file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PidFileError(
            f"pid file {path}: cannot be read ({exc.strerror or exc}): is the gateway running?"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _text(fd)  # locked: its gateway is running
        else:
            raise PidFileError(
                f"pid file {path}: no gateway runs with it (process {_text(fd) or '?'} left it behind)"
            )
    finally:
        os.close(fd)
    if not text:
        raise PidFileError(f"pid file {path}: its gateway is still starting; try again")
    if not text.isdigit() or int(text) < 1:
        raise PidFileError(f"pid file {path}: {text[:20]!r} is not a process id")
    return int(text)


def _text(fd: int) -> str:
    return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
