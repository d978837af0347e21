"""metrics.multiprocess_dir: where `--workers N` keeps prometheus-client's multiprocess files.

A read-only root filesystem (`docker run --read-only`) has no writable temporary directory, so the workers'
shared metrics directory can be configured, and a directory that cannot be made or written stops the start
with one line naming the setting, never a traceback. The subprocess gateways come from test_lifecycle.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_lifecycle import (  # the subprocess gateway machinery, fixtures included
    EXIT_STARTUP_FAILED,
    START_TIMEOUT,
    Spawn,
    fetch,
    poll,
    run_cli,
    session,  # noqa: F401
    spawn,  # noqa: F401
    spawn_workers,
    write_config,
)
from upstream_server import UpstreamServer

from gateway import supervisor
from gateway.observability.metrics import MULTIPROC_ENV

WORKERS = 2


def requests_counted(scrape: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(scrape)
        if family.name == "gateway_requests"
        for sample in family.samples
        if sample.name == "gateway_requests_total"
    )


async def test_workers_keep_their_metrics_in_the_configured_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstream: UpstreamServer,
    spawn: Spawn,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where the default temporary directory would go
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    metrics_dir = tmp_path / "run" / "metrics"  # missing: the supervisor creates it
    config = write_config(tmp_path, metrics={"multiprocess_dir": str(metrics_dir)})
    gw = await spawn(config, upstream.url, "--workers", str(WORKERS))
    await gw.wait_healthy(session)
    workers = {e["worker_pid"] for e in await gw.wait_event("worker_started", count=WORKERS)}
    assert spawn_workers(gw.pid) == workers

    sent = 10
    for _ in range(sent):
        status, _, _ = await fetch(session, f"{gw.url}/echo/counted")
        assert status == 200

    # Each worker writes its own files there (counter_<pid>.db, ...) as soon as it imports the metrics.
    def files_of_every_worker() -> bool:
        pids = {int(p.stem.rpartition("_")[2]) for p in metrics_dir.glob("*.db")}
        return workers <= pids

    await poll(
        files_of_every_worker, within=START_TIMEOUT, what=f"metrics files of {workers} in {metrics_dir}"
    )
    # One scrape of any worker sums every worker's counts from that directory.
    _, body, _ = await fetch(session, f"{gw.admin_url}/metrics")
    assert requests_counted(body.decode()) == sent
    assert list(scratch.iterdir()) == [], "a temporary directory was made although one was configured"

    gw.proc.terminate()
    assert await gw.wait_exit(30) == 0, gw.output()
    assert metrics_dir.is_dir(), "an operator's directory is kept at exit (a fresh temporary one is removed)"


def test_a_directory_that_cannot_be_made_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory", encoding="utf-8")
    wanted = in_the_way / "metrics"
    config = write_config(tmp_path, metrics={"multiprocess_dir": str(wanted)})
    result = run_cli(
        "serve", "--config", str(config), "--upstream", "http://127.0.0.1:9", f"--workers={WORKERS}",
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
    )  # fmt: skip
    assert result.returncode == EXIT_STARTUP_FAILED, result
    assert result.stderr == (
        f"cannot start: metrics.multiprocess_dir = {str(wanted)!r}: cannot create or write the directory "
        f"({os.strerror(20)}); --workers needs a writable one for the workers' metrics files\n"
    )
    assert "worker_started" not in result.stdout, "workers started without a metrics directory"
    assert result.survivors == []


# --- the choice of directory, in this process ----------------------------------------------------------

# sysfs refuses to create files even for root, so an existing directory nobody can write is at hand even
# where the tests run as root (a chmod'ed directory would not stop root).
UNWRITABLE = Path("/sys")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """_fresh_metrics_dir sets PROMETHEUS_MULTIPROC_DIR for the workers: undone after each test, so this
    process's own metrics never switch to multiprocess mode."""
    monkeypatch.setenv(MULTIPROC_ENV, "placeholder")
    monkeypatch.delenv(MULTIPROC_ENV)
    return monkeypatch


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="needs Linux's /sys")
def test_an_existing_directory_that_cannot_be_written_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(supervisor.MetricsDirError) as info:
        supervisor._fresh_metrics_dir(str(UNWRITABLE))
    assert str(info.value).startswith(f"metrics.multiprocess_dir = '{UNWRITABLE}': cannot create or write")
    assert MULTIPROC_ENV not in os.environ


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="needs Linux's /sys")
def test_an_unwritable_prometheus_multiproc_dir_is_named(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(MULTIPROC_ENV, str(UNWRITABLE))
    with pytest.raises(supervisor.MetricsDirError) as info:
        supervisor._fresh_metrics_dir(None)
    assert str(info.value).startswith(f"PROMETHEUS_MULTIPROC_DIR = '{UNWRITABLE}': cannot create or write")


def test_the_configured_directory_beats_prometheus_multiproc_dir(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv(MULTIPROC_ENV, str(tmp_path / "from-env"))
    configured = tmp_path / "configured"
    stale = configured / "counter_999999999.db"  # an earlier run's, of a process long gone
    configured.mkdir()
    stale.write_bytes(b"")
    assert supervisor._fresh_metrics_dir(str(configured)) == (str(configured), False)  # kept at exit
    assert os.environ[MULTIPROC_ENV] == str(configured)  # what the workers inherit
    assert not stale.exists()
    assert not (tmp_path / "from-env").exists()


def test_without_a_setting_a_fresh_temporary_directory_is_made_and_owned(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setattr("tempfile.tempdir", str(tmp_path))
    directory, owned = supervisor._fresh_metrics_dir(None)
    assert owned
    assert Path(directory).parent == tmp_path and Path(directory).is_dir()
    assert os.environ[MULTIPROC_ENV] == directory
