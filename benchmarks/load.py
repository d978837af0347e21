"""Load generators. Both report the same numbers so the table can mix them (it never does within one run)."""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

REQUEST_TIMEOUT_S = 5.0


class LoadError(RuntimeError):
    """The load generator itself failed (as opposed to the target answering errors)."""


@dataclass(frozen=True)
class LoadResult:
    tool: str
    requests: int  # completed responses, any status (wrk counts the same way)
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx responses + socket errors/timeouts


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile; 0.0 for no samples so a dead target still prints a row."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return asyncio.new_event_loop


async def _drive(
    url: str, connections: int, duration: float, max_requests: int, headers: Mapping[str, str]
) -> LoadResult:
    latencies_ns: list[int] = []
    errors = 0
    issued = 0
    # limit=connections: exactly C keep-alive connections, like wrk -c.
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=dict(headers)) as session:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal errors, issued
            # Two bounds: the clock, and a request budget in case the clock check is starved.
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter_ns()
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                latencies_ns.append(time.perf_counter_ns() - t0)
                if not 200 <= status < 300:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    ms = sorted(ns / 1e6 for ns in latencies_ns)
    return LoadResult(
        tool="python",
        requests=len(ms),
        seconds=elapsed,
        rps=len(ms) / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        errors=errors,
    )


def run_python(
    url: str, connections: int, duration: float, headers: Mapping[str, str], max_requests: int
) -> LoadResult:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_drive(url, connections, duration, max_requests, headers))


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_time_ms(text: str, pct: int) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if m is None:
        raise LoadError(f"wrk output has no {pct}% latency line")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(text: str) -> LoadResult:
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if total is None or rps is None:
        raise LoadError("unrecognised wrk output")
    # wrk counts status >= 400 here despite the label; 3xx never happens against these targets.
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return LoadResult(
        tool="wrk",
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNIT_MS[total.group(3)] / 1e3,
        rps=float(rps.group(1)),
        p50_ms=_wrk_time_ms(text, 50),
        p99_ms=_wrk_time_ms(text, 99),
        errors=errors,
    )


def run_wrk(url: str, connections: int, duration: float, headers: Mapping[str, str]) -> LoadResult:
    # wrk only takes whole seconds.
    seconds = max(1, math.ceil(duration))
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={REQUEST_TIMEOUT_S:g}s",
        "--latency",
    ]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"wrk did not finish within {seconds + 30}s") from exc
    if proc.returncode != 0:
        raise LoadError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    try:
        return parse_wrk(proc.stdout)
    except LoadError as exc:
        raise LoadError(f"{exc}:\n{proc.stdout}") from exc
