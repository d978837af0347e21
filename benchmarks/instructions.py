"""Instructions per request of the gateway process, counted by valgrind's callgrind: a figure that repeats
within about 0.3% between runs, where CPU time on a shared box moves by ±15%. For a difference of a few
percent between configurations (tracing's cost, say) that the µs figures of `python -m benchmarks` cannot
resolve. Not to the instruction: how many requests one event-loop iteration or one Redis round trip carries
depends on timing, so compare runs made alike (several valgrind runs at once on 2 cores moved the figure
by up to 1%).

    .venv/bin/python -m benchmarks.instructions [--requests 6000] [--only NAME[,NAME]]

Each scenario (SCENARIOS in harness.py, the full one and its tracing variants by default) runs under
callgrind, counting from after a warm-up through its SIGTERM stop, so spans still queued are encoded and
sent within the count; the tracing scenarios export only in full batches and at the stop, as a busy gateway
does. Slow: valgrind runs the gateway some fifty times slower.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.harness import (
    FULL,
    HOST,
    JWT_SECRET,
    PATH,
    ROOT,
    SCENARIOS,
    child_env,
    free_ports,
    log_tail,
    redis_server,
    scenario_yaml,
    server,
)

DEFAULT = (FULL.name, "full-propagation", "full+tracing1%")
_WARMUP = 300
_CONNECTIONS = 4


async def _load(url: str, headers: dict[str, str], requests: int) -> None:
    left = requests

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(_CONNECTIONS)))


def _ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    async def poll() -> None:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"exited with {proc.returncode} before {url} answered")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.5)
            raise RuntimeError(f"{url} not ready after {timeout:g}s")

    asyncio.run(poll())


def _count(name: str, upstream: str, tmp: Path, requests: int) -> float:
    scenario = next(s for s in SCENARIOS if s.name == name)
    with contextlib.ExitStack() as stack:
        redis_port = stack.enter_context(redis_server(name, tmp, 30)) if scenario.redis else None
        config = tmp / f"{name.replace('%', 'pct')}.yaml"
        # schedule_delay: no export by the clock under valgrind's slowness, only full batches and the stop.
        config.write_text(scenario_yaml(scenario, upstream, redis_port, schedule_delay=3600))
        port, admin = free_ports(2)
        stem = name.replace("+", "_").replace("%", "pct")  # valgrind reads % in a file name as a format
        out = tmp / f"{stem}.callgrind"
        argv = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "gateway", "serve", "--config", str(config),
            "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin}", "--upstream", upstream,
        ]  # fmt: skip
        env = child_env({"BENCH_JWT_SECRET": JWT_SECRET, **scenario.env})
        log = tmp / f"{name}.log"
        with log.open("wb") as output:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            try:
                _ready(f"http://{HOST}:{admin}/healthz", proc, 600)
            except RuntimeError as exc:
                raise SystemExit(f"{name}: {exc}\n{log_tail(log)}") from None
            url, headers = f"http://{HOST}:{port}{PATH}", dict(scenario.headers)
            asyncio.run(_load(url, headers, _WARMUP))
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
            asyncio.run(_load(url, headers, requests))
            proc.send_signal(signal.SIGTERM)  # callgrind writes its counts as the process exits
            proc.wait(600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    totals = [
        int(line.split()[1])
        for part in tmp.glob(f"{stem}.callgrind*")
        for line in part.read_text().splitlines()
        if line.startswith("totals:")
    ]
    return sum(totals) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--only", default=",".join(DEFAULT), help="scenario names, comma-separated")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (callgrind_control comes with it)")
    names = args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="voipbin-instructions-") as tmpdir:
        tmp = Path(tmpdir)
        (up_port,) = free_ports(1)
        upstream = f"http://{HOST}:{up_port}"
        argv = [sys.executable, "-m", "benchmarks.upstream", "--port", str(up_port)]
        with server("upstream", argv, upstream + PATH, tmp, 30):
            print(f"{'scenario':28} {'k instructions/request':>24} {'vs first':>9}", flush=True)
            first = None
            for name in names:
                per_request = _count(name, upstream, tmp, args.requests)
                first = first or per_request
                print(f"{name:28} {per_request / 1000:24.1f} {per_request / first - 1:+9.1%}", flush=True)


if __name__ == "__main__":
    main()
