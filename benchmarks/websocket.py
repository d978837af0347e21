"""WebSocket relay through the gateway: CPU seconds per MB relayed and RSS per open connection.

A measuring tool like the rest of benchmarks/: it prints numbers and asserts nothing about them. The gateway
(`python -m gateway serve`, one worker, imported from the checkout this file is in) relays to an aiohttp
upstream of this module, run as a subprocess: `/ws` counts what it receives (`stats` answers the count) and
pushes on request (`push N SIZE`), `/ws-echo` echoes. The client is the `websockets` library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import yaml
from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from benchmarks.harness import HOST, ROOT, StartError, child_env, cpu_seconds, free_ports, server
from benchmarks.upstream import serve

WS_PATH = "/ws"  # the upstream counts (stats) and pushes (push N SIZE)
ECHO_PATH = "/ws-echo"  # the upstream echoes every message
READY_PATH = "/ready"
MB = 1_000_000
MAX_CONNECTIONS = 5000  # the memory runs hold this many at most (each is a socket pair in the gateway)
OPEN_CONCURRENCY = 50  # handshakes in flight at once while the memory runs open their connections


def _payload() -> bytes:
    """1 MiB of VoIPBIN-style JSON events, the same for every run: compressible as real traffic is (the
    records differ in a counter and a timestamp), so runs with and without permessage-deflate compare."""
    records = []
    size = 0
    i = 0
    while size < 1 << 20:
        record = (
            b'{"type":"call_updated","data":{"id":"5e7bd0a8-8a38-11ec-%04x-c3b8a2e5c8f3","status":"progressing",'
            b'"direction":"outgoing","source":{"type":"tel","target":"+8210%08d"},'
            b'"tm_update":"2022-02-10 07:%02d:%02d.%06d","seq":%d}}\n'
            % (i % 0xFFFF, i * 7919 % 10**8, i // 60 % 60, i % 60, i * 104729 % 10**6, i)
        )
        records.append(record)
        size += len(record)
        i += 1
    return b"".join(records)[: 1 << 20]


PAYLOAD = _payload()


def chunks(size: int) -> list[bytes]:
    """Distinct messages of `size` bytes cut from PAYLOAD (cycled by senders)."""
    if size >= len(PAYLOAD):
        return [(PAYLOAD * (size // len(PAYLOAD) + 1))[:size]]
    return [PAYLOAD[o : o + size] for o in range(0, len(PAYLOAD) - size + 1, size)]


# --- the upstream (a subprocess: `python -m benchmarks.websocket --serve-upstream PORT`) --------------------


async def _upstream_sink(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()  # compress=True: takes permessage-deflate if the gateway offers it
    await ws.prepare(request)
    offered = request.headers.get("Sec-WebSocket-Extensions", "")
    received = messages = 0
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            received += len(msg.data)
            messages += 1
        elif msg.type is WSMsgType.TEXT:
            command, *rest = msg.data.split()
            if command == "stats":
                stats = {"bytes": received, "messages": messages, "offered": offered, "deflate": ws.compress}
                await ws.send_str(json.dumps(stats))
                received = messages = 0
            elif command == "push":
                count, size = int(rest[0]), int(rest[1])
                parts = chunks(size)
                for i in range(count):
                    await ws.send_bytes(parts[i % len(parts)])
    return ws


async def _upstream_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


async def _ready(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def serve_upstream(port: int) -> None:
    app = web.Application()
    app.router.add_get(WS_PATH, _upstream_sink)
    app.router.add_get(ECHO_PATH, _upstream_echo)
    app.router.add_get(READY_PATH, _ready)
    serve(app, port)


# --- the gateway -----------------------------------------------------------------------------------------


def gateway_yaml(connections: int, gateway_compression: bool) -> str:
    raw: dict[str, Any] = {
        "server": {"max_in_flight": max(10_000, 2 * connections + 100)},
        "upstream": {"pool": {"max_websockets": max(1000, 2 * connections + 100)}},
        "logging": {"access_log": False},  # one line per connection, at its close: out of every figure
        "routes": [
            {"name": "ws", "path": WS_PATH, "websocket": True, "auth": "none"},
            {"name": "ws-echo", "path": ECHO_PATH, "websocket": True, "auth": "none"},
        ],
    }
    if gateway_compression:  # a section of the newer tree; the older one refuses to start with it
        raw["websocket"] = {"compression": True}
    return yaml.safe_dump(raw)


@dataclass
class Gateway:
    pid: int
    base: str  # ws://host:port


@contextlib.contextmanager
def gateway(
    name: str, upstream: str, tmp: Path, args: argparse.Namespace, connections: int
) -> Iterator[Gateway]:
    port, admin = free_ports(2)
    config = tmp / f"{name}.yaml"
    config.write_text(gateway_yaml(connections, args.gateway_compression))
    argv = [
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin}", "--upstream", upstream,
    ]  # fmt: skip
    with server(name, argv, f"http://{HOST}:{admin}/healthz", tmp, args.start_timeout) as proc:
        yield Gateway(proc.pid, f"ws://{HOST}:{port}")


def gateway_module() -> str:
    """Where the gateway subprocesses import `gateway` from (they run with cwd = this checkout)."""
    out = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        cwd=ROOT,
        env=child_env({}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip() or f"? ({out.stderr.strip()[-200:]})"


# --- the client ------------------------------------------------------------------------------------------


def _connect(url: str, compress: bool) -> connect:
    return connect(
        url,
        compression="deflate" if compress else None,
        proxy=None,  # never through a proxy from the environment
        ping_interval=None,  # no keepalive pings in the figures
        open_timeout=30,
        close_timeout=10,
        max_size=None,
    )


def negotiated(ws: ClientConnection) -> str:
    header = ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
    names = [type(e).__name__ for e in ws.protocol.extensions]
    return f"{header or 'none'} ({', '.join(names) or 'no extension'})"


@dataclass
class Transfer:
    direction: str  # up: client -> upstream, down: upstream -> client
    message_bytes: int
    messages: int
    mb: float
    seconds: float
    gateway_cpu_s: float
    extensions: str  # what the client negotiated with the gateway
    upstream_offer: str  # Sec-WebSocket-Extensions the gateway sent the upstream

    @property
    def cpu_s_per_mb(self) -> float:
        return self.gateway_cpu_s / self.mb

    @property
    def mb_per_s(self) -> float:
        return self.mb / self.seconds if self.seconds else 0.0


async def _stats(ws: ClientConnection) -> dict[str, Any]:
    await ws.send("stats")
    answer = await ws.recv()
    return json.loads(answer)


async def transfer(gw: Gateway, direction: str, total: int, size: int, compress: bool) -> Transfer:
    """Relay `total` payload bytes in messages of `size` one way; the gateway's CPU over exactly that."""
    count = max(1, total // size)
    parts = chunks(size)
    async with _connect(gw.base + WS_PATH, compress) as ws:
        stats = await _stats(ws)  # the connection is relayed both ways before the clock starts
        cpu, start = cpu_seconds(gw.pid), time.perf_counter()
        if direction == "up":
            for i in range(count):
                await ws.send(parts[i % len(parts)])
            stats = await _stats(ws)  # answered after the last message reached the upstream
            if stats["bytes"] != count * size:
                raise RuntimeError(f"upstream counted {stats['bytes']} bytes, sent {count * size}")
        else:
            await ws.send(f"push {count} {size}")
            received = 0
            while received < count * size:
                message = await ws.recv()
                if not isinstance(message, bytes):
                    raise RuntimeError(f"unexpected text message {message[:80]!r}")
                received += len(message)
        spent, elapsed = cpu_seconds(gw.pid) - cpu, time.perf_counter() - start
        return Transfer(
            direction,
            size,
            count,
            count * size / MB,
            elapsed,
            spent,
            negotiated(ws),
            stats["offered"] or "none",
        )


@dataclass
class Memory:
    label: str
    connections: int
    failed: int
    message_bytes: int
    rss_before: int
    rss_open: int
    rss_closed: int
    extensions: str

    @property
    def kib_per_connection(self) -> float:
        return (self.rss_open - self.rss_before) / 1024 / self.connections if self.connections else 0.0


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def memory(gw: Gateway, label: str, k: int, size: int, compress: bool) -> Memory:
    """RSS growth of the gateway with `k` connections open, each having had one `size`-byte message echoed."""
    message = chunks(size)[0]
    url = gw.base + ECHO_PATH

    async def exchange(ws: ClientConnection) -> None:
        await ws.send(message)
        echoed = await ws.recv()
        if echoed != message:
            raise RuntimeError("echo differs from the message sent")

    # A first connection: lazy imports and first-use allocations stay out of the figure.
    async with _connect(url, compress) as ws:
        await exchange(ws)
        extensions = negotiated(ws)
    before = rss(gw.pid)
    opened: list[ClientConnection] = []
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> None:
        async with gate:
            ws = await _connect(url, compress)
            opened.append(ws)
            await exchange(ws)

    try:
        results = await asyncio.gather(*(one() for _ in range(k)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            print(f"  {label}: {len(errors)} of {k} connections failed: {errors[0]!r}", file=sys.stderr)
        after = rss(gw.pid)
    finally:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    closed = rss(gw.pid)
    ok = k - len(errors)
    return Memory(label, ok, len(errors), size, before, after, closed, extensions)


# --- the report ------------------------------------------------------------------------------------------


def print_transfers(rows: list[Transfer]) -> None:
    if not rows:
        return
    print(f"\n{'direction':<26} {'message':>8} {'MB':>6} {'MB/s':>7} {'gw cpu s':>9} {'gw cpu s/MB':>12}")
    for r in rows:
        way = "client->upstream" if r.direction == "up" else "upstream->client"
        size = f"{r.message_bytes // 1024} KiB" if r.message_bytes % 1024 == 0 else f"{r.message_bytes} B"
        print(
            f"{way:<26} {size:>8} {r.mb:>6.0f} {r.mb_per_s:>7.1f} {r.gateway_cpu_s:>9.2f} "
            f"{r.cpu_s_per_mb:>12.5f}"
        )
    print(f"client<->gateway extensions: {rows[0].extensions}")
    print(f"gateway->upstream offer: {rows[0].upstream_offer}")


def print_memory(rows: list[Memory]) -> None:
    if not rows:
        return
    print(f"\n{'memory':<24} {'conns':>6} {'message':>8} {'RSS before':>11} {'RSS open':>10} {'KiB/conn':>9}")
    for r in rows:
        failed = f" ({r.failed} failed)" if r.failed else ""
        print(
            f"{r.label:<24} {r.connections:>6} {r.message_bytes:>8} {r.rss_before / 2**20:>9.1f}Mi "
            f"{r.rss_open / 2**20:>8.1f}Mi {r.kib_per_connection:>9.1f}"
            f"   (after close {r.rss_closed / 2**20:.1f}Mi){failed}"
        )
    print(f"client<->gateway extensions: {rows[0].extensions}")


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.websocket", description=__doc__)
    p.add_argument("--mb", type=float, default=100.0, help="MB (10^6 bytes) relayed per direction and size")
    p.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[65536, 1024],
        help="message sizes in bytes for the CPU runs (default 65536,1024)",
    )
    p.add_argument("--connections", "-k", type=int, default=500, help="memory: connections, small message")
    p.add_argument("--small-bytes", type=int, default=200, help="memory: the small message's size")
    p.add_argument("--big-connections", type=int, default=100, help="memory: connections, big message")
    p.add_argument("--big-bytes", type=int, default=100_000, help="memory: the big message's size")
    p.add_argument(
        "--compress", action="store_true", help="the client offers permessage-deflate (default: it does not)"
    )
    p.add_argument(
        "--gateway-compression",
        action="store_true",
        help="write `websocket: {compression: true}` into the gateway's config (newer trees only)",
    )
    p.add_argument("--only", choices=["cpu", "memory"], help="run one half only")
    p.add_argument("--start-timeout", type=float, default=30.0, help="seconds for each server to be ready")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds for the whole run, then stop")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.mb <= 10_000 or not args.sizes or min(args.sizes) < 1 or max(args.sizes) > 4 << 20:
        p.error("--mb must be in (0, 10000] and --sizes between 1 B and 4 MiB")
    for flag in ("connections", "big_connections"):
        if not 1 <= getattr(args, flag) <= MAX_CONNECTIONS:
            p.error(f"--{flag.replace('_', '-')} must be 1..{MAX_CONNECTIONS}")
    if not 1 <= args.small_bytes <= 4 << 20 or not 1 <= args.big_bytes <= 4 << 20:
        p.error("--small-bytes and --big-bytes must be 1 B .. 4 MiB")
    return args


async def run(args: argparse.Namespace, tmp: Path, transfers: list[Transfer], memories: list[Memory]) -> None:
    """Fills `transfers` and `memories` as it goes, so a timeout still reports what was measured."""
    (up_port,) = free_ports(1)
    upstream = f"http://{HOST}:{up_port}"
    up_argv = [sys.executable, "-m", "benchmarks.websocket", "--serve-upstream", str(up_port)]
    with server("ws-upstream", up_argv, upstream + READY_PATH, tmp, args.start_timeout):
        if args.only in (None, "cpu"):
            print("cpu: relaying ...", file=sys.stderr, flush=True)
            with gateway("gateway-cpu", upstream, tmp, args, 1) as gw:
                for direction in ("up", "down"):  # warm-up: first connection, lazy imports, buffers
                    await transfer(gw, direction, 2 * MB, max(args.sizes), args.compress)
                for size in args.sizes:
                    for direction in ("up", "down"):
                        transfers.append(
                            await transfer(gw, direction, int(args.mb * MB), size, args.compress)
                        )
        if args.only in (None, "memory"):
            variants: list[tuple[str, int, int]] = [
                ("after small message", args.connections, args.small_bytes),
                ("after big message", args.big_connections, args.big_bytes),
            ]
            for label, k, size in variants:
                print(f"memory: {k} connections, {size} B each ...", file=sys.stderr, flush=True)
                # A fresh gateway each: memory freed by earlier runs would hide new allocations.
                with gateway(f"gateway-mem-{size}", upstream, tmp, args, k) as gw:
                    memories.append(await memory(gw, label, k, size, args.compress))


def _exit_on_sigterm(signum: int, _: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream)
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    print(f"gateway imported from: {gateway_module()}")
    print(
        f"client offers permessage-deflate: {'yes' if args.compress else 'no'}; "
        f"gateway websocket.compression in config: {'true' if args.gateway_compression else 'not set'}; "
        f"payload: JSON events (the same for every run), binary messages; access log off"
    )
    status = 0
    transfers: list[Transfer] = []
    memories: list[Memory] = []
    with tempfile.TemporaryDirectory(prefix="voipbin-wsbench-") as tmpdir:
        try:
            _run_bounded(lambda: run(args, Path(tmpdir), transfers, memories), args.timeout)
        except StartError as exc:
            print(f"cannot benchmark: {exc}", file=sys.stderr)
            status = 1
        except TimeoutError as exc:  # --timeout, or a handshake's own (an OSError too: caught first)
            print(f"timed out ({exc!r}; --timeout {args.timeout:g}s)", file=sys.stderr)
            status = 1
        except (RuntimeError, OSError, WebSocketException) as exc:  # a relay broke: report what was measured
            print(f"run failed: {exc!r}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            print("interrupted; servers stopped", file=sys.stderr)
            status = 130
    print_transfers(transfers)
    print_memory(memories)
    if args.json:
        doc = {
            "compress": args.compress,
            "gateway_compression": args.gateway_compression,
            "transfers": [
                {**asdict(t), "cpu_s_per_mb": t.cpu_s_per_mb, "mb_per_s": t.mb_per_s} for t in transfers
            ],
            "memory": [{**asdict(m), "kib_per_connection": m.kib_per_connection} for m in memories],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return status


def _run_bounded(make: Callable[[], Awaitable[None]], timeout: float) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await make()

    asyncio.run(bounded())


if __name__ == "__main__":
    raise SystemExit(main())
