"""`--workers N`: N gateway processes sharing the listening ports through SO_REUSEPORT.

The supervisor itself serves nothing. It restarts a worker that dies, passes SIGTERM/SIGINT on to all of
them, waits for their drain, and exits 0 when they did.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog
from prometheus_client import multiprocess

from gateway import logs, server
from gateway.auth.setup import preflight
from gateway.config import ConfigError, GatewayConfig
from gateway.observability.metrics import MULTIPROC_ENV, wipe_earlier_runs
from gateway.reload import ConfigSource, hold_sighup, restart_only_changes, with_restart_only_from

log = structlog.get_logger("gateway.supervisor")

EXIT_STARTUP_FAILED = 3
_PR_SET_PDEATHSIG = 1
_RESTART_BACKOFF_MAX = 5.0
_STOP_GRACE = 5.0


def _stop_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel send SIGTERM when the supervisor dies (SIGKILL, OOM), so a worker drains and exits
    instead of serving on unsupervised. Linux only; elsewhere orphans keep running until stopped."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class MetricsDirError(Exception):
    """The workers' metrics directory cannot be made or written; the message names the setting to change."""


def _fresh_metrics_dir(configured: str | None) -> tuple[str, bool]:
    """A directory for prometheus-client's multiprocess files, inherited by every worker: one scrape of any
    worker then sums them all. Values left by an earlier run must not be summed in (wipe_earlier_runs).
    Returns the directory and whether it is ours to remove: a fresh one is; one an operator chose
    (metrics.multiprocess_dir, else $PROMETHEUS_MULTIPROC_DIR) only loses the files of processes no longer
    running."""
    given, setting = configured, "metrics.multiprocess_dir"
    if given is None:
        given, setting = os.environ.get(MULTIPROC_ENV), MULTIPROC_ENV
    try:
        if given:
            os.makedirs(given, exist_ok=True)
            with tempfile.TemporaryFile(dir=given):  # writable, not just there: every worker adds files
                pass
        directory = given or tempfile.mkdtemp(prefix="voipbin-gateway-metrics-")
        wipe_earlier_runs(directory)
    except OSError as exc:
        problem = exc.strerror or str(exc)
        if given:
            raise MetricsDirError(
                f"{setting} = {given!r}: cannot create or write the directory ({problem}); --workers needs a "
                "writable one for the workers' metrics files"
            ) from None
        raise MetricsDirError(
            f"cannot create a temporary directory for the workers' metrics files ({problem}); set "
            "metrics.multiprocess_dir to a writable directory (or make the temporary directory writable)"
        ) from None
    os.environ[MULTIPROC_ENV] = directory
    return directory, not given


def _worker_main(config: GatewayConfig, source: ConfigSource, index: int, supervisor_pid: int) -> None:
    _stop_with_supervisor(supervisor_pid)
    logs.configure(config.logging.level, config.logging.format)
    structlog.contextvars.bind_contextvars(worker=index)
    try:
        server.run(config, reuse_port=True, source=source)
    except OSError as exc:
        log.error("worker_start_failed", error=str(exc))
        raise SystemExit(EXIT_STARTUP_FAILED) from None


class Supervisor:
    def __init__(self, config: GatewayConfig, source: ConfigSource | None = None) -> None:
        self._config = config
        self._bound = config
        """The config the supervisor started with: what restart-only keys keep, for every worker."""
        self._source = source or ConfigSource()
        self._reload_requested = False
        self._mp = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited loop or sockets
        self._workers: dict[int, BaseProcess] = {}
        self._stopping = False
        self._failures: dict[int, int] = {}
        self._respawn_at: dict[int, float] = {}

    def run(self) -> int:
        """Supervise until stopped; the exit code. MetricsDirError before any worker starts."""
        metrics_dir, owned = _fresh_metrics_dir(self._config.metrics.multiprocess_dir)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held back since start (hold_sighup)
        try:
            return self._supervise()
        finally:
            if owned:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def _supervise(self) -> int:
        for index in range(self._config.server.workers):
            self._spawn(index)
        log.info("supervisor_started", pid=os.getpid(), workers=self._config.server.workers)
        while not self._stopping:
            wait([p.sentinel for p in self._workers.values() if p.exitcode is None], timeout=0.2)
            if self._reload_requested and not self._stopping:
                self._reload_requested = False
                self._reload()
            for index, proc in list(self._workers.items()):
                if proc.exitcode is None or self._stopping or index in self._respawn_at:
                    continue
                if proc.exitcode == EXIT_STARTUP_FAILED:
                    log.error("worker_cannot_start", worker=index)
                    self._stop_all()
                    return EXIT_STARTUP_FAILED
                self._schedule_restart(index, proc.exitcode)
                if proc.pid is not None:
                    multiprocess.mark_process_dead(proc.pid)  # its live gauges leave the scrape
            now = time.monotonic()
            for index, due in list(self._respawn_at.items()):
                if due <= now and not self._stopping:
                    del self._respawn_at[index]
                    self._spawn(index)
        return self._stop_all()

    def _spawn(self, index: int) -> None:
        proc = self._mp.Process(
            target=_worker_main,
            args=(self._config, self._source, index, os.getpid()),
            name=f"gateway-worker-{index}",
        )
        # The new process starts with SIGHUP held back (a signal mask outlives exec) until it handles it:
        # a reload while a worker starts must not end the worker (SIGHUP's default action).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc.start()
        finally:
            if not self._stopping:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        self._workers[index] = proc
        log.info("worker_started", worker=index, worker_pid=proc.pid)

    def _schedule_restart(self, index: int, exitcode: int) -> None:
        failures = self._failures[index] = self._failures.get(index, 0) + 1
        log.warning("worker_died", worker=index, exitcode=exitcode, restarts=failures)
        # Back off on repeated crashes so a worker that dies at once cannot spin the CPU.
        self._respawn_at[index] = time.monotonic() + min(_RESTART_BACKOFF_MAX, 0.1 * 2 ** (failures - 1))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested = True

    def _reload(self) -> None:
        """Check the config once here, then have every worker apply it (each reads it itself); workers
        started from now on start with it. A config that fails is logged here and no worker is asked."""
        try:
            config = self._source.load()
            asyncio.run(preflight(config))
            restart_only = restart_only_changes(self._bound, config)
            config = with_restart_only_from(self._bound, config)
        except ConfigError as exc:
            log.error("config_reload_failed", reason="signal", problems=str(exc).splitlines())
            return
        if restart_only:
            log.warning("config_reload_needs_restart", keys=restart_only)
        self._config = config
        for proc in self._workers.values():
            if proc.exitcode is None and proc.pid is not None:
                os.kill(proc.pid, signal.SIGHUP)
        log.info("config_reload_requested", workers=len(self._workers))

    def _stop_all(self) -> int:
        hold_sighup()  # no more reloads, and no default action (the process's end) for a late SIGHUP
        log.info("supervisor_stopping", workers=len(self._workers))
        for proc in self._workers.values():
            if proc.exitcode is None and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._config.server.drain_timeout + _STOP_GRACE
        for proc in self._workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error("worker_killed_after_drain_timeout", worker_pid=proc.pid)
                proc.kill()
                proc.join()
        codes = [proc.exitcode for proc in self._workers.values()]
        log.info("supervisor_stopped", exitcodes=codes)
        # -SIGTERM: a worker still starting up (no signal handler yet) when we asked it to stop; it served
        # nothing, so that is a clean stop too.
        return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1
