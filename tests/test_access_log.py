"""The access log's per-tick buffer (gateway/logs.py) and minted request ids: lines written once per loop
tick, whole, at most PIPE_BUF bytes per write to a pipe, never after a later log line, never lost at exit;
ids unique across forked processes."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gateway import logs
from gateway.request_id import new_request_id

ROOT = Path(__file__).resolve().parent.parent


class Pipe:
    """sys.stdout pointed at a pipe (by attach(), in the test itself: pytest's capture sets sys.stdout again
    between the fixtures and the test), and every write(2) to it recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        # Room for every line a test writes before it reads: a full pipe blocks the writer (by design).
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.stdout = open(write_fd, "w", encoding="utf-8")
        self.writes: list[bytes] = []
        real_write = os.write

        def write(fd: int, data: bytes | memoryview) -> int:
            if fd == write_fd:
                self.writes.append(bytes(data))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
        self._monkeypatch = monkeypatch

    def attach(self) -> Pipe:
        self._monkeypatch.setattr(sys, "stdout", self.stdout)
        return self

    def read(self) -> str:
        chunks = []
        while True:
            try:
                chunk = os.read(self.read_fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()

    def close(self) -> None:
        self.stdout.close()
        os.close(self.read_fd)


@pytest.fixture
def pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipe]:
    logs.flush_access_log()  # nothing of an earlier test's lines ends up in this pipe
    p = Pipe(monkeypatch)
    try:
        yield p
    finally:
        logs.flush_access_log()
        p.close()


def lines_of(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_outside_an_event_loop_each_line_is_written_at_once(pipe: Pipe) -> None:
    pipe.attach()
    log = logs.access_logger()
    log.info("request", request_id="req_a", path="/x")
    [line] = lines_of(pipe.read())
    assert (line["event"], line["request_id"], line["logger"], line["level"]) == (
        "request",
        "req_a",
        "gateway.access",
        "info",
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", str(line["timestamp"]))


async def test_lines_of_one_tick_go_out_in_one_write_after_it(pipe: Pipe) -> None:
    pipe.attach()
    log = logs.access_logger()
    for i in range(5):
        log.info("request", request_id=f"req_{i}")
    assert pipe.read() == "" and pipe.writes == []  # still this tick
    await asyncio.sleep(0)
    assert [line["request_id"] for line in lines_of(pipe.read())] == [f"req_{i}" for i in range(5)]
    assert len(pipe.writes) == 1
    log.info("request", request_id="req_next")
    await asyncio.sleep(0)
    assert [line["request_id"] for line in lines_of(pipe.read())] == ["req_next"]
    assert len(pipe.writes) == 2


async def test_each_write_is_whole_lines_of_at_most_pipe_buf(pipe: Pipe) -> None:
    pipe.attach()
    log = logs.access_logger()
    n = 200
    for i in range(n):
        log.info("request", request_id=f"req_{i}", path="/p?" + "x" * (i % 7 * 100))
    log.info("request", request_id="req_long", path="/" + "y" * 9000)  # longer than PIPE_BUF alone
    await asyncio.sleep(0)
    text = pipe.read()
    assert [line["request_id"] for line in lines_of(text)] == [*(f"req_{i}" for i in range(n)), "req_long"]
    assert len(pipe.writes) > 1
    for write in pipe.writes:
        assert write.endswith(b"\n")
        assert len(write) <= select.PIPE_BUF or write.count(b"\n") == 1
    assert b"".join(pipe.writes).decode() == text


async def test_a_burst_is_written_within_the_tick_past_the_bound(pipe: Pipe) -> None:
    pipe.attach()
    log = logs.access_logger()
    line_bytes = 1000
    for i in range(logs._MAX_BUFFERED // line_bytes + 10):
        log.info("request", request_id=f"req_{i}", path="z" * line_bytes)
    written = len(pipe.read())  # without a tick passing
    assert written >= logs._MAX_BUFFERED
    assert 0 < logs.ACCESS._size < logs._MAX_BUFFERED  # the rest waits for the tick, as usual


async def test_another_log_line_first_writes_the_access_lines_before_it(pipe: Pipe) -> None:
    pipe.attach()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, structlog.get_config())
    logs.configure("info", "json")  # its handler holds the sys.stdout of now: the pipe
    structlog.configure(cache_logger_on_first_use=False)
    try:
        access = logs.access_logger()
        access.info("request", request_id="req_1")
        structlog.get_logger("gateway.test").info("app_event")
        access.info("request", request_id="req_2")
        logging.getLogger("aiohttp.server").warning("stdlib_event")
        await asyncio.sleep(0)
    finally:
        root.handlers[:], level, config = saved
        root.setLevel(level)
        structlog.configure(**config)
    events = [(line["event"], line.get("request_id")) for line in lines_of(pipe.read())]
    assert events == [
        ("request", "req_1"),
        ("app_event", None),
        ("request", "req_2"),
        ("stdlib_event", None),
    ]


def test_console_format_goes_through_the_same_buffer(pipe: Pipe) -> None:
    pipe.attach()
    logs.access_logger("console").info("request", request_id="req_console")
    out = pipe.read()
    assert "req_console" in out and out.endswith("\n") and out.count("\n") == 1


@pytest.mark.parametrize("how", ["return", "sys.exit", "exception_handled"])
def test_lines_of_the_last_tick_are_written_at_exit(how: str) -> None:
    """The loop ends (or the process exits) before the tick's flush runs: the atexit flush writes them."""
    program = f"""
import asyncio, sys
from gateway import logs
log = logs.access_logger()
async def main():
    for i in range(3):
        log.info("request", request_id=f"req_{{i}}")
    if {how!r} == "sys.exit":
        sys.exit(0)
    if {how!r} == "exception_handled":
        raise KeyError("x")
loop = asyncio.new_event_loop()
try:
    loop.run_until_complete(main())
except KeyError:
    pass
# the loop never ran the flush it was given: no tick after the lines
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert [line["request_id"] for line in lines_of(done.stdout)] == ["req_0", "req_1", "req_2"]


def test_stdout_gone_loses_lines_without_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the reader is gone: EPIPE
    stdout = open(write_fd, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    lost = logs.ACCESS.lost
    try:
        logs.access_logger().info("request", request_id="req_nowhere")
    finally:
        stdout.close()
    assert logs.ACCESS.lost == lost + 1


# ---------------------------------------------------------------------------------------- request ids


def test_minted_request_ids_are_unique_across_forked_processes() -> None:
    """A forked child must not repeat its parent's sequence (the generator is reseeded after fork)."""
    parent_first = [new_request_id() for _ in range(50)]
    children = []
    for _ in range(3):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its ids to the pipe, then out without running the parent's teardown
            try:
                os.write(write_fd, " ".join(new_request_id() for _ in range(200)).encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as reader:
            children.append(reader.read().decode().split())
        os.waitpid(pid, 0)
    parent_after = [new_request_id() for _ in range(200)]
    every = parent_first + parent_after + [rid for ids in children for rid in ids]
    assert all(len(ids) == 200 for ids in children)
    assert len(set(every)) == len(every)
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", rid) for rid in every)


def test_minted_request_ids_differ_between_processes() -> None:
    program = "from gateway.request_id import new_request_id; print(new_request_id())"
    ids = {
        subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=30
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(ids) == 3 and all(re.fullmatch(r"req_[0-9a-f]{32}", rid) for rid in ids)
