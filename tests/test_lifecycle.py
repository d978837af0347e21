"""The `serve` command as a real process: graceful drain, drain timeout, worker supervision, startup
failures, CLI/config errors, flat memory under gigabyte streams, and response framing on the wire.

Every gateway here is a subprocess on loopback ports found by binding port 0; the misbehaving upstream runs in
the test's own event loop. Readiness is polled (never slept for), every wait has a deadline, and every process
a test starts is killed in the fixture's teardown, workers included (each gateway runs in its own session, so
its whole process group can be killed by the id of the process we started).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import psutil
import pytest
import yaml
from conftest import MakeGateway
from prometheus_client.parser import text_string_to_metric_families
from redis_server import free_port, free_ports
from upstream_server import CHUNK, UpstreamServer, pattern_bytes, pattern_sha256

import gateway

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "config" / "gateway.yaml"
LOOPBACK = "127.0.0.1"

START_TIMEOUT = 20.0  # spawn + imports on a busy 2-core machine
EXIT_CONFIG_ERROR = 2
EXIT_STARTUP_FAILED = 3
STOP_GRACE = 5.0  # gateway.supervisor._STOP_GRACE: the supervisor's own allowance on top of drain_timeout

GIB = 1024**3
MIB = 1024**2
STREAM_CHUNK = 256 * 1024
RSS_GROWTH_LIMIT = 64 * MIB


# --------------------------------------------------------------------------------------------- helpers


def write_config(tmp_path: Path, *, drain_timeout: float = 5.0, **extra: Any) -> Path:
    raw: dict[str, Any] = {
        "server": {"drain_timeout": drain_timeout},
        "routes": [{"name": "all", "prefix": "/", "auth": "none"}],
        **extra,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


async def poll(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    within: float,
    what: str,
    interval: float = 0.02,
) -> None:
    """Call `check` until it is true; bounded in time and in the number of tries."""
    deadline = time.monotonic() + within
    for _ in range(int(within / interval) + 2):
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in wire order
    raw_body: bytes  # as framed on the wire (chunk sizes included when chunked)

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        if (self.header("transfer-encoding") or "").lower() == "chunked":
            return dechunk(self.raw_body)
        return self.raw_body

    def json(self) -> Any:
        return json.loads(self.body)


def dechunk(data: bytes) -> bytes:
    """Decode a complete chunked body; fails on a truncated or malformed one."""
    out = bytearray()
    pos = 0
    for _ in range(len(data) + 1):
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            assert data[pos:] == b"\r\n", f"no trailers expected, got {data[pos:]!r}"
            return bytes(out)
        out += data[pos : pos + size]
        assert data[pos + size : pos + size + 2] == b"\r\n", "chunk not terminated by CRLF"
        pos += size + 2
    raise AssertionError("chunked body without a last chunk")


async def raw_request(port: int, method: str, target: str, *, within: float = 10.0) -> RawResponse:
    """One request on a fresh connection with `Connection: close`; the response is read to EOF, byte-exact."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(f"{method} {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = [
        (name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)
    ]
    return RawResponse(int(status_line.split(" ")[1]), headers, body)


def assert_canonical_503(resp: RawResponse) -> None:
    assert resp.status == 503
    envelope = resp.json()
    error = envelope["error"]
    assert (error["status"], error["reason"]) == ("UNAVAILABLE", "SERVICE_UNAVAILABLE"), envelope
    assert error["request_id"] == resp.header("x-request-id")
    assert error["message"]


def spawn_workers(supervisor_pid: int) -> set[int]:
    """The supervisor's worker processes (the spawn start method also runs a resource tracker, no worker)."""
    pids = set()
    for child in psutil.Process(supervisor_pid).children():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


def upstream_connections(pid: int, upstream_port: int) -> int:
    """Established TCP connections process `pid` holds to the upstream."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.raddr.port == upstream_port
    )


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    stdout_other: list[str] = field(default_factory=list)
    stderr: bytearray = field(default_factory=bytearray)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def output(self) -> str:
        lines = [json.dumps(line) for line in self.logs] + self.stdout_other
        return "stdout:\n" + "\n".join(lines) + "\nstderr:\n" + self.stderr.decode(errors="replace")

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e for e in self.logs if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    async def wait_event(
        self, name: str, *, count: int = 1, within: float = START_TIMEOUT, **match: Any
    ) -> list[dict[str, Any]]:
        what = f"{count}x {name} {match}"
        await poll(lambda: len(self.events(name, **match)) >= count, within=within, what=what)
        return self.events(name, **match)

    async def wait_exit(self, within: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise AssertionError(f"gateway still running after {within}s\n{self.output()}") from None

    async def wait_healthy(self, session: aiohttp.ClientSession, within: float = START_TIMEOUT) -> None:
        async def healthy() -> bool:
            if self.proc.returncode is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}\n{self.output()}")
            try:
                async with session.get(
                    f"{self.admin_url}/healthz", timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    return resp.status == 200 and await resp.json() == {"status": "ok"}
            except (aiohttp.ClientError, TimeoutError):
                return False

        await poll(healthy, within=within, what="/healthz", interval=0.05)


async def _read_stdout(gw: GatewayProcess, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\n")
        try:
            parsed = json.loads(text)
        except ValueError:
            gw.stdout_other.append(text)
        else:
            (gw.logs if isinstance(parsed, dict) else gw.stdout_other).append(parsed)


async def _read_stderr(gw: GatewayProcess, stream: asyncio.StreamReader) -> None:
    while chunk := await stream.read(65536):
        gw.stderr += chunk


Spawn = Callable[..., Awaitable[GatewayProcess]]


def follow_output(gw: GatewayProcess) -> GatewayProcess:
    """Collect a started process's log lines and stderr as they come."""
    assert gw.proc.stdout is not None and gw.proc.stderr is not None
    gw.tasks = [
        asyncio.create_task(_read_stdout(gw, gw.proc.stdout)),
        asyncio.create_task(_read_stderr(gw, gw.proc.stderr)),
    ]
    return gw


async def reap(started: list[Any]) -> None:
    """Kill every process a test started with start_new_session, workers included, and stop reading it."""
    for gw in started:
        # The group is the process we started plus its workers, orphaned ones included.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(gw.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gw.proc.wait(), 10)
        _, pending = await asyncio.wait(gw.tasks, timeout=5)
        for task in pending:
            task.cancel()


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """spawn(config_path, upstream_url, *extra_args) → a started `serve` process (not yet known healthy)."""
    started: list[GatewayProcess] = []

    async def factory(config: Path, upstream_url: str, *extra: str) -> GatewayProcess:
        port, admin_port = free_ports(2)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config),
            "--listen", f"{LOOPBACK}:{port}", "--admin-listen", f"{LOOPBACK}:{admin_port}",
            "--upstream", upstream_url, *extra,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        started.append(follow_output(GatewayProcess(proc, port, admin_port)))
        return started[-1]

    try:
        yield factory
    finally:
        await reap(started)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """Every request on a fresh connection, so each goes through the listener (and SO_REUSEPORT hashing)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as client:
        # aiohttp silently re-sends a GET whose connection dropped; a request that failed must fail here.
        client._retry_connection = False
        yield client


def slow_requests(upstream: UpstreamServer, path: str) -> int:
    return sum(1 for seen in upstream.requests if seen.raw_path == path)


async def fetch(session: aiohttp.ClientSession, url: str, within: float = 30) -> tuple[int, bytes, Any]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=within)) as resp:
        return resp.status, await resp.read(), resp.headers.copy()


# ------------------------------------------------------------------------------------- 1. graceful stop


async def test_sigterm_drains_in_flight_requests_and_exits_0(
    tmp_path: Path, upstream: UpstreamServer, spawn: Spawn, session: aiohttp.ClientSession
) -> None:
    drain_timeout = 5.0
    gw = await spawn(write_config(tmp_path, drain_timeout=drain_timeout), upstream.url)
    await gw.wait_healthy(session)
    await gw.wait_event("gateway_started")

    async def ready() -> bool:
        return (await raw_request(gw.admin_port, "GET", "/readyz")).status == 200

    await poll(ready, within=10, what="/readyz 200 before the stop")

    n, path = 20, "/slow?delay=1.0"
    in_flight = [asyncio.create_task(fetch(session, gw.url + path)) for _ in range(n)]
    try:
        await poll(
            lambda: slow_requests(upstream, path) == n, within=10, what=f"upstream to see {n} requests"
        )
        gw.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # New connections: answered (200 before the signal is handled, 503 in the envelope while draining),
        # then refused once the listener is closed, which must happen while the old requests still run.
        seen: list[int | str] = []
        refused_while_draining = None
        for _ in range(500):
            try:
                resp = await raw_request(gw.port, "GET", "/echo/after-sigterm", within=5)
            except ConnectionRefusedError:
                refused_while_draining = not any(task.done() for task in in_flight)
                break
            except (ConnectionResetError, asyncio.IncompleteReadError) as exc:
                seen.append(type(exc).__name__)  # accepted by the kernel just before the listener closed
            else:
                seen.append(resp.status)
                assert resp.status in (200, 503), (resp.status, resp.body)
                if resp.status == 503:
                    assert_canonical_503(resp)
            assert time.monotonic() - signalled < 3, (
                f"still accepting 3 s after SIGTERM: {collections.Counter(seen)}"
            )
        outcomes = collections.Counter(seen)
        assert refused_while_draining is True, f"listener closed only after the drain ended: {outcomes}"

        readyz = await raw_request(gw.admin_port, "GET", "/readyz")
        assert readyz.status == 503
        assert readyz.json()["status"] == "not_ready"
        assert readyz.json()["checks"]["server"] == "draining"
        assert not any(task.done() for task in in_flight), "drain over before /readyz was checked"

        results = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=drain_timeout + 5)
    finally:
        for task in in_flight:
            task.cancel()
    for status, body, headers in results:
        assert (status, body) == (200, b"ok")
        assert headers["Content-Length"] == "2"

    code = await gw.wait_exit(drain_timeout + 3 - (time.monotonic() - signalled))
    assert code == 0, gw.output()
    # The n slow requests, plus any probe admitted just before the signal was handled (answered 200 above).
    [draining] = gw.events("gateway_draining")
    assert n <= draining["in_flight"] <= n + seen.count(200), (draining, outcomes)
    assert gw.events("gateway_stopped", pid=gw.pid)
    assert slow_requests(upstream, path) == n  # nothing was retried or replayed during the drain


async def test_request_reaching_a_draining_gateway_gets_503_envelope(
    upstream: UpstreamServer, make_gateway: MakeGateway, client: aiohttp.ClientSession
) -> None:
    """The other half of "refused or 503": in the subprocess the listener closes in the same step as draining
    starts, so this answer is only reachable in a narrow race; in-process it can be forced."""
    gw = await make_gateway(upstream.url)
    assert gw.server.gateway is not None
    gw.server.gateway.admission.draining = True
    async with client.get(f"{gw.url}/echo/while-draining") as resp:
        body = await resp.read()
        connection = resp.headers.get("Connection")
    assert_canonical_503(RawResponse(resp.status, [(k.lower(), v) for k, v in resp.headers.items()], body))
    assert connection == "close"
    assert upstream.requests == []


async def test_access_lines_stay_whole_and_none_is_lost_with_workers_and_a_drain(
    tmp_path: Path, upstream: UpstreamServer, spawn: Spawn, session: aiohttp.ClientSession
) -> None:
    """Two workers write their buffered access lines to one stdout pipe: every line whole (long lines, so a
    tick's lines often pass PIPE_BUF and go out in several writes), and the lines of requests still in flight
    at SIGTERM written before the workers exit."""
    drain_timeout = 5.0
    # At level warning no later log line (gateway_stopped...) writes the access lines out for them: they
    # must get out on their own, at the tick or at the drain's end.
    config = write_config(tmp_path, drain_timeout=drain_timeout, logging={"level": "warning"})
    gw = await spawn(config, upstream.url, "--workers", "2")

    def listening() -> bool:
        workers = spawn_workers(gw.pid)
        return len(workers) == 2 and all(
            any(c.status == psutil.CONN_LISTEN and c.laddr.port == gw.port for c in conns)
            for conns in (psutil.Process(pid).net_connections(kind="tcp") for pid in workers)
        )

    await poll(listening, within=START_TIMEOUT, what="both workers listening")
    await gw.wait_healthy(session)

    pad = "p" * 1500  # lines of about 2 KB
    gate = asyncio.Semaphore(48)

    async def burst_request(i: int) -> tuple[int, bytes, Any]:
        async with gate:
            return await fetch(session, f"{gw.url}/echo/burst?n={i}&pad={pad}")

    burst = await asyncio.gather(*(burst_request(i) for i in range(240)))
    assert {status for status, _, _ in burst} == {200}

    n, path = 20, "/slow?delay=1.0&round=drain"
    in_flight = [asyncio.create_task(fetch(session, gw.url + path)) for _ in range(n)]
    try:
        await poll(lambda: slow_requests(upstream, path) == n, within=10, what=f"{n} requests at upstream")
        gw.proc.send_signal(signal.SIGTERM)
        drained = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=drain_timeout + 5)
    finally:
        for task in in_flight:
            task.cancel()
    assert [(status, body) for status, body, _ in drained] == [(200, b"ok")] * n
    code = await gw.wait_exit(drain_timeout + STOP_GRACE + 3)
    assert code == 0, gw.output()
    await asyncio.wait(gw.tasks, timeout=10)  # stdout read to its end

    assert gw.stdout_other == [], "a line on stdout is not one whole JSON object"
    assert not gw.events("gateway_stopped"), "info lines are not logged at level warning"
    access = {e["request_id"]: e for e in gw.events("request")}
    assert len(access) == len(gw.events("request")), "a request was logged twice"
    burst_ids = [headers["X-Request-ID"] for _, _, headers in burst]
    drained_ids = [headers["X-Request-ID"] for _, _, headers in drained]
    assert not [rid for rid in burst_ids + drained_ids if rid not in access], "access lines lost"
    assert all(access[rid]["path"].endswith(pad) for rid in burst_ids)
    assert all((access[rid]["status"], access[rid]["path"]) == (200, path) for rid in drained_ids)
    assert {access[rid]["worker"] for rid in burst_ids} == {0, 1}, "one worker served the whole burst"


# -------------------------------------------------------------------------------------- 2. drain timeout


async def test_drain_timeout_bounds_shutdown_with_a_hung_request(
    tmp_path: Path, upstream: UpstreamServer, spawn: Spawn, session: aiohttp.ClientSession
) -> None:
    drain_timeout = 0.5
    gw = await spawn(write_config(tmp_path, drain_timeout=drain_timeout), upstream.url)
    await gw.wait_healthy(session)
    await gw.wait_event("gateway_started")

    hung = asyncio.create_task(fetch(session, gw.url + "/hang", within=30))
    try:
        await poll(lambda: slow_requests(upstream, "/hang") == 1, within=10, what="upstream to see /hang")
        gw.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await gw.wait_exit(drain_timeout + 3)
        elapsed = time.monotonic() - signalled
        assert code == 0, gw.output()
        # It waited for the request (drain), but not for long.
        assert 0.8 * drain_timeout <= elapsed <= drain_timeout + 3, elapsed
        assert [e["in_flight"] for e in gw.events("gateway_draining")] == [1]
        # The hung request is cut off, never answered as if it had succeeded.
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(hung, timeout=5)
    finally:
        hung.cancel()


# ---------------------------------------------------------------------------------------- 3. --workers 2


async def test_workers_share_the_port_are_restarted_and_stop_together(
    tmp_path: Path, upstream: UpstreamServer, spawn: Spawn, session: aiohttp.ClientSession
) -> None:
    drain_timeout = 2.0
    gw = await spawn(write_config(tmp_path, drain_timeout=drain_timeout), upstream.url, "--workers", "2")
    started = await gw.wait_event("worker_started", count=2)
    pids = {e["worker"]: e["worker_pid"] for e in started}
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
    await gw.wait_event("supervisor_started")
    # Both workers listening (each logs gateway_started once bound), not just whichever answers /healthz.
    for pid in pids.values():
        await gw.wait_event("gateway_started", pid=pid)
    await gw.wait_healthy(session)
    assert spawn_workers(gw.pid) == set(pids.values())

    async def all_workers_serve(workers: set[int], tag: str) -> None:
        """Requests on fresh connections; while they are in flight each worker holds upstream connections."""
        n, path = 40, f"/slow?delay=1.0&round={tag}"
        tasks = [asyncio.create_task(fetch(session, gw.url + path)) for _ in range(n)]
        try:
            await poll(
                lambda: slow_requests(upstream, path) == n, within=10, what=f"{n} requests at upstream"
            )
            serving = {pid: upstream_connections(pid, upstream.port) for pid in workers}
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)
        finally:
            for task in tasks:
                task.cancel()
        assert all(count > 0 for count in serving.values()), f"not every worker served: {serving}"
        assert sum(serving.values()) >= n  # one upstream connection per in-flight request, none elsewhere
        assert [(status, body) for status, body, _ in results] == [(200, b"ok")] * n
        request_ids = {headers["X-Request-ID"] for _, _, headers in results}
        assert len(request_ids) == n and all(rid.startswith("req_") for rid in request_ids)

    await all_workers_serve(set(pids.values()), "before")

    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    died = await gw.wait_event("worker_died", worker=0, within=10)
    assert died[0]["exitcode"] == -signal.SIGKILL
    # The surviving worker keeps the port answering at once, before the replacement is up.
    for _ in range(10):
        status, _, _ = await fetch(session, gw.url + "/echo/after-kill", within=10)
        assert status == 200

    restarted = await gw.wait_event("worker_started", count=3, within=10)
    replacement = restarted[-1]
    assert replacement["worker"] == 0 and replacement["worker_pid"] not in (victim, pids[1])
    await gw.wait_event("gateway_started", pid=replacement["worker_pid"])
    workers = {pids[1], replacement["worker_pid"]}
    assert spawn_workers(gw.pid) == workers
    assert not psutil.pid_exists(victim)
    await all_workers_serve(workers, "after")

    gw.proc.send_signal(signal.SIGTERM)
    code = await gw.wait_exit(drain_timeout + STOP_GRACE + 3)
    assert code == 0, gw.output()
    assert gw.events("supervisor_stopped")[-1]["exitcodes"] == [0, 0]
    for pid in workers:
        assert gw.events("gateway_stopped", pid=pid), f"worker {pid} did not drain"
        assert not psutil.pid_exists(pid), f"worker {pid} outlived the supervisor"
    assert len(gw.events("worker_started")) == 3  # no restarts during the stop


async def test_workers_stop_when_the_supervisor_is_killed(
    tmp_path: Path, upstream: UpstreamServer, spawn: Spawn, session: aiohttp.ClientSession
) -> None:
    gw = await spawn(write_config(tmp_path, drain_timeout=1.0), upstream.url, "--workers", "2")
    started = await gw.wait_event("worker_started", count=2)
    workers = {e["worker_pid"] for e in started}
    for pid in workers:
        await gw.wait_event("gateway_started", pid=pid)
    gw.proc.send_signal(signal.SIGKILL)
    await poll(lambda: not any(psutil.pid_exists(pid) for pid in workers), within=10, what="orphans to exit")
    for pid in workers:
        assert gw.events("gateway_stopped", pid=pid), f"worker {pid} did not drain"


async def test_sigterm_while_workers_start_exits_0(
    tmp_path: Path, upstream: UpstreamServer, spawn: Spawn
) -> None:
    """A stop requested while the workers are still importing is still a clean stop: nothing was serving, so
    nothing was lost, and the supervisor must neither hang, leave workers behind nor report a failure."""
    drain_timeout = 2.0
    gw = await spawn(write_config(tmp_path, drain_timeout=drain_timeout), upstream.url, "--workers", "2")
    started = await gw.wait_event("worker_started", count=2)
    await gw.wait_event("supervisor_started")
    gw.proc.send_signal(signal.SIGTERM)
    code = await gw.wait_exit(drain_timeout + STOP_GRACE + 3)
    assert not any(psutil.pid_exists(e["worker_pid"]) for e in started), "a worker outlived the supervisor"
    assert len(gw.events("worker_started")) == 2
    assert code == 0, gw.output()


# ------------------------------------------------------------------------------------ 4. startup failure


@contextlib.contextmanager
def occupied_port() -> Iterator[int]:
    """A listening socket bound without SO_REUSEADDR/SO_REUSEPORT: nothing else can bind its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        yield sock.getsockname()[1]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    survivors: list[str]  # processes of its group (workers, say) still running 3 s after it exited


def run_cli(*args: str, within: float = START_TIMEOUT) -> CliResult:
    """Run `python -m gateway ...` to completion; its whole process group is killed afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"`{' '.join(args)}` still running after {within}s\n{out}\n{err}") from None
    try:
        # The supervisor's resource tracker exits on its own just after it; a worker would not.
        deadline = time.monotonic() + 3
        for _ in range(300):
            survivors = live_group_members(proc.pid)
            if not survivors or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return CliResult(proc.returncode, out, err, survivors)


def live_group_members(pgid: int) -> list[str]:
    """Command lines of the processes still running (zombies aside) in process group `pgid`."""
    members = []
    for member in psutil.process_iter(["status", "cmdline"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(member.pid) == pgid and member.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(" ".join(member.info["cmdline"] or []))
    return members


def log_events(stdout: str) -> list[dict[str, Any]]:
    events = []
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                events.append(parsed)
    return events


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("taken", ["listen", "admin-listen"])
def test_port_in_use_exits_3_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, taken: str
) -> None:
    config = write_config(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where the supervisor makes its metrics directory
    with occupied_port() as busy:
        ports = {"listen": free_port(), "admin-listen": free_port(), taken: busy}
        addresses = [f"--{flag}={LOOPBACK}:{port}" for flag, port in ports.items()]
        started = time.monotonic()
        upstream = "--upstream=http://127.0.0.1:9"
        result = run_cli("serve", f"--config={config}", upstream, *addresses, f"--workers={workers}")
        elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_STARTUP_FAILED, output
    assert elapsed < 15, elapsed
    assert os.strerror(errno.EADDRINUSE) in output, output
    events = log_events(result.stdout)
    assert not [
        e for e in events if e.get("event") == "gateway_started" and e.get("listen", "").endswith(f":{busy}")
    ]
    if workers == 1:
        assert result.stderr.startswith("cannot start:"), output
    else:
        # Each worker failed to start once; the supervisor gave up instead of restarting them.
        spawned = [e["worker_pid"] for e in events if e.get("event") == "worker_started"]
        assert len(spawned) == workers, output
        assert any(e.get("event") == "worker_start_failed" for e in events), output
        assert any(e.get("event") == "worker_cannot_start" for e in events), output
        assert result.survivors == [], "a worker outlived the supervisor"
    assert list(scratch.iterdir()) == []  # no metrics directory left behind


def test_port_in_use_message_names_the_address(tmp_path: Path) -> None:
    """Which of listen/admin_listen is taken must be in the message: 'Address already in use' alone is not
    enough for an operator to act on."""
    with occupied_port() as busy:
        result = run_cli(
            "serve", "--config", str(write_config(tmp_path)), "--upstream", "http://127.0.0.1:9",
            "--listen", f"{LOOPBACK}:{free_port()}", "--admin-listen", f"{LOOPBACK}:{busy}",
        )  # fmt: skip
    assert result.returncode == EXIT_STARTUP_FAILED
    assert f"{LOOPBACK}:{busy}" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------- 5. config and CLI


@pytest.mark.parametrize(
    ("yaml_text", "key", "value"),
    [
        ("server:\n  drain_timeout: -1\n", "server.drain_timeout", "-1"),
        ("server:\n  drian_timeout: 1\n", "server.drian_timeout", "1"),
        ("admin_listen: nowhere\n", "admin_listen", "'nowhere'"),
        ("routes:\n  - name: all\n    prefix: no-slash\n    auth: none\n", "routes[0]", "no-slash"),
    ],
)
def test_bad_config_exits_2_naming_key_and_value(
    tmp_path: Path, yaml_text: str, key: str, value: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    # --listen only: the file's own (bad) admin_listen must not be overridden.
    listen = f"{LOOPBACK}:{free_port()}"
    result = run_cli(
        "serve", "--config", str(config), "--listen", listen, "--upstream", "http://127.0.0.1:9", within=10
    )
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout + result.stderr
    assert key in result.stderr and value in result.stderr, result.stderr
    assert str(config) in result.stderr
    assert "gateway_started" not in result.stdout


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [
        ("--workers", "0", "server.workers"),
        ("--listen", "localhost", "listen"),
        ("--upstream", "ftp://x", "upstream.url"),
    ],
)
def test_bad_command_line_override_exits_2(tmp_path: Path, flag: str, value: str, key: str) -> None:
    result = run_cli("serve", "--config", str(write_config(tmp_path)), flag, value, within=10)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout + result.stderr
    assert f"{key} = " in result.stderr and value in result.stderr, result.stderr


def test_check_config_accepts_the_shipped_file() -> None:
    result = run_cli("check-config", "--config", str(SHIPPED_CONFIG))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_check_config_rejects_a_bad_file_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("upstream:\n  retries: 9\n", encoding="utf-8")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 1
    assert "upstream.retries = 9" in result.stderr, result.stderr
    assert "ok" not in result.stdout


def test_version_prints_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"voipbin-gateway {gateway.__version__}"


# ------------------------------------------------------------------------- 6. flat memory, 1 GiB each way


class RssSampler:
    """Samples a process's RSS every 50 ms in the background while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.samples: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def rss(self) -> int:
        rss: int = self._proc.memory_info().rss
        return rss

    async def _run(self) -> None:
        for _ in range(10 * 60 * 20):  # at most ten minutes of samples
            self.samples.append(self.rss())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.05)
            if self._stop.is_set():
                return

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 5)
        self.samples.append(self.rss())


async def stream_upload(session: aiohttp.ClientSession, url: str, size: int) -> tuple[str, dict[str, Any]]:
    """POST `size` pattern bytes made on the fly (chunked): the sender's sha256, the upstream's report."""
    chunk = pattern_bytes(0, STREAM_CHUNK)  # STREAM_CHUNK is a multiple of 256: every chunk is the same bytes
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for offset in range(0, size, STREAM_CHUNK):
            piece = chunk[: min(STREAM_CHUNK, size - offset)]
            digest.update(piece)
            yield piece

    timeout = aiohttp.ClientTimeout(total=120, sock_read=30)
    async with session.post(url, data=body(), timeout=timeout) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        report = await resp.json()
    return digest.hexdigest(), report


async def stream_download(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str | None]:
    """GET and hash while reading; (bytes read, sha256, Content-Length header)."""
    digest, size = hashlib.sha256(), 0
    timeout = aiohttp.ClientTimeout(total=120, sock_read=30)
    async with session.get(url, timeout=timeout) as resp:
        assert resp.status == 200
        async for piece in resp.content.iter_any():
            size += len(piece)
            digest.update(piece)
        return size, digest.hexdigest(), resp.headers.get("Content-Length")


@pytest.fixture
async def big_gateway(
    tmp_path: Path, upstream: UpstreamServer, spawn: Spawn, session: aiohttp.ClientSession
) -> GatewayProcess:
    gw = await spawn(write_config(tmp_path, limits={"max_body_bytes": "2GiB"}), upstream.url)
    await gw.wait_healthy(session)
    await gw.wait_event("gateway_started")
    return gw


def report_rate(label: str, size: int, seconds: float, baseline: int, peak: int) -> None:
    print(
        f"\n{label}: {size / MIB:.0f} MiB in {seconds:.1f} s = {size / MIB / seconds:.0f} MiB/s; "
        f"gateway RSS baseline {baseline / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB "
        f"(+{(peak - baseline) / MIB:.1f})"
    )


@pytest.mark.slow
async def test_upload_1gib_streams_with_flat_memory(
    big_gateway: GatewayProcess, upstream: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    url = big_gateway.url + "/sink"
    sampler = RssSampler(big_gateway.pid)
    sent, report = await stream_upload(session, url, 64 * MIB)  # warm-up: pools, buffers, allocator arenas
    assert report == {"size": 64 * MIB, "sha256": sent}
    baseline = sampler.rss()

    started = time.monotonic()
    async with sampler:
        sent, report = await stream_upload(session, url, GIB)
    elapsed = time.monotonic() - started
    peak = max(sampler.samples)
    report_rate("upload", GIB, elapsed, baseline, peak)
    assert report == {"size": GIB, "sha256": sent}
    assert sent == pattern_sha256(GIB)
    assert len(sampler.samples) >= 10, "too few RSS samples to mean anything"
    assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew {(peak - baseline) / MIB:.1f} MiB"


@pytest.mark.slow
async def test_download_1gib_streams_with_flat_memory(
    big_gateway: GatewayProcess, upstream: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    sampler = RssSampler(big_gateway.pid)
    warm = 64 * MIB
    assert await stream_download(session, f"{big_gateway.url}/bytes/{warm}") == (
        warm,
        pattern_sha256(warm),
        str(warm),
    )
    baseline = sampler.rss()

    expected = asyncio.create_task(asyncio.to_thread(pattern_sha256, GIB))
    started = time.monotonic()
    async with sampler:
        result = await stream_download(session, f"{big_gateway.url}/bytes/{GIB}")
    elapsed = time.monotonic() - started
    peak = max(sampler.samples)
    report_rate("download", GIB, elapsed, baseline, peak)
    assert result == (GIB, await expected, str(GIB))
    assert len(sampler.samples) >= 10, "too few RSS samples to mean anything"
    assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew {(peak - baseline) / MIB:.1f} MiB"


# ------------------------------------------------------------------------------- 7. framing on the wire


@pytest.mark.parametrize("size", [0, 1000, 3 * CHUNK + 17])
async def test_response_framing_follows_the_upstream(
    upstream: UpstreamServer, make_gateway: MakeGateway, size: int
) -> None:
    gw = await make_gateway(upstream.url)

    chunked = await raw_request(gw.port, "GET", f"/bytes/{size}?chunked=1")
    assert chunked.status == 200
    assert chunked.header_all("transfer-encoding") == ["chunked"]
    assert chunked.header_all("content-length") == []
    assert chunked.body == pattern_bytes(0, size)

    sized = await raw_request(gw.port, "GET", f"/bytes/{size}")
    assert sized.status == 200
    assert sized.header_all("content-length") == [str(size)]
    assert sized.header_all("transfer-encoding") == []
    assert sized.raw_body == pattern_bytes(0, size)


# --- observability of real processes ------------------------------------------------------------------

PROCESS_JWT_SECRET = "process-tests-secret-of-at-least-32-bytes"


def requests_total(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels.get("route") == "all"
    )


async def test_one_scrape_shows_every_workers_counts(
    tmp_path: Path,
    upstream: UpstreamServer,
    spawn: Spawn,
    session: aiohttp.ClientSession,
) -> None:
    gw = await spawn(write_config(tmp_path), upstream.url, "--workers", "2")
    started = await gw.wait_event("worker_started", count=2)
    for event in started:
        [ready] = await gw.wait_event("gateway_started", pid=event["worker_pid"])
        assert ready["event_loop"] == "uvloop"  # a dependency, so always installed
    for _ in range(40):  # fresh connections, spread over both workers by SO_REUSEPORT
        async with session.get(f"{gw.url}/echo/x") as resp:
            assert resp.status == 200
    for _ in range(5):  # whichever worker answers the scrape, it reports all of them
        async with session.get(f"{gw.admin_url}/metrics") as resp:
            text = await resp.text()
            assert requests_total(text) == 40
            assert "gateway_redis_up" not in text  # no Redis configured: neither up nor down
    access = gw.events("request")
    served_by = {line.get("worker") for line in access}
    assert len(access) == 40
    assert served_by == {0, 1}, "both workers should have served (SO_REUSEPORT spreads connections)"
    # The CLI runs on uvloop, whose loop.time() ticks in whole milliseconds: durations must not.
    durations = [line["duration_ms"] for line in access] + [line["upstream_ms"] for line in access]
    assert any(d != round(d) for d in durations), durations
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(15) == 0


async def test_an_operators_metrics_directory_forgets_earlier_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstream: UpstreamServer,
    spawn: Spawn,
    session: aiohttp.ClientSession,
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    config = write_config(tmp_path)

    async def serve_three() -> GatewayProcess:
        gw = await spawn(config, upstream.url)
        await gw.wait_healthy(session)
        for _ in range(3):
            async with session.get(f"{gw.url}/echo/x") as resp:
                assert resp.status == 200
        return gw

    async def scraped(gw: GatewayProcess) -> float:
        async with session.get(f"{gw.admin_url}/metrics") as resp:
            return requests_total(await resp.text())

    earlier = await serve_three()
    earlier.proc.send_signal(signal.SIGTERM)
    assert await earlier.wait_exit(15) == 0
    sibling = await serve_three()  # a restart: the earlier run's counts are gone
    assert await scraped(sibling) == 3
    latest = await serve_three()  # a second live process on the directory: both count
    assert await scraped(latest) == 6


async def test_no_credential_reaches_any_line_the_gateway_writes(
    tmp_path: Path,
    upstream: UpstreamServer,
    spawn: Spawn,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = jwt.encode({"type": "agent", "customer_id": "c", "exp": 4102444800}, PROCESS_JWT_SECRET, "HS256")
    bad_token = jwt.encode({"type": "agent", "exp": 1}, PROCESS_JWT_SECRET, "HS256")
    planted = ["plantedkey-q-111", "plantedkey-c-222", "plantedcookie-333", "plantedbasic-444"]
    planted += [token, bad_token]
    config = write_config(
        tmp_path,
        auth={
            "jwt": {"keys": [{"algorithms": ["HS256"], "secret_env": "PROC_TEST_SECRET"}]},
            "introspect": {"jwt": False},
            "access_keys": {"stores": []},
        },
        routes=[{"name": "all", "prefix": "/"}],
        logging={"level": "debug"},
    )
    monkeypatch.setenv("PROC_TEST_SECRET", PROCESS_JWT_SECRET)  # inherited by the gateway process
    gw = await spawn(config, upstream.url)
    await gw.wait_healthy(session)
    attempts = [
        ({"Authorization": f"Bearer {token}"}, "/echo/a?page=1"),
        ({"Authorization": f"Bearer {bad_token}"}, "/echo/b"),
        ({}, f"/echo/c?accesskey={planted[0]}&page=2"),
        ({"Cookie": f"accesskey={planted[1]}; theme=dark"}, "/echo/d"),
        ({"Cookie": f"session={planted[2]}", "Authorization": f"Bearer {token}"}, "/echo/e"),
        ({"Authorization": f"Basic {planted[3]}"}, "/echo/f"),
        ({"Authorization": f"Bearer {token}"}, f"/echo/g?token={token}&accesskey={planted[0]}"),
        ({"Authorization": "Bearer " + "x" * 20000 + planted[3]}, "/echo/h"),  # over the header limit
    ]
    for headers, path in attempts:
        async with session.get(gw.url + path, headers=headers) as resp:
            await resp.read()
    await asyncio.sleep(0)  # the scenario's last line is read by the background reader
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(15) == 0
    output = gw.output()
    assert len(gw.events("request")) >= len(attempts) - 1
    for secret in planted:
        assert secret not in output, f"a planted credential reached the gateway's output: {secret[:16]}..."
