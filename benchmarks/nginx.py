"""The `nginx` reference target: a minimal nginx reverse proxy in front of the same upstream.

It answers "how far is the gateway from a proxy written in C": the same request, the same keep-alive pool to
the upstream, one process. `master_process off` makes nginx serve from the process it starts as (no master
forking workers), so it is one process on one core like the single-worker gateway, and the pid the harness
started is the one whose CPU time it reads. nginx documents that mode as for development; here it only
removes an idle master from the picture. The access log stays on, buffered, as a production nginx would
have it: the gateway writes one too.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Container
from pathlib import Path

# Debian puts nginx in /usr/sbin, which is not on a non-root user's PATH.
FALLBACK_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
# nginx creates every temp directory of the modules compiled in at startup, by default under /var/lib/nginx:
# all of them go to the run's temp dir, but naming a module that was left out is a config error.
TEMP_PATH_MODULES = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def find_nginx() -> str | None:
    """The nginx binary from PATH or a usual sbin directory; None when there is none."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in FALLBACK_PATHS if shutil.which(p)), None)


def compiled_without(binary: str) -> set[str]:
    """The modules of TEMP_PATH_MODULES this build was configured without (`nginx -V`, on stderr)."""
    try:
        proc = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    text = proc.stderr + proc.stdout
    return {m for m in TEMP_PATH_MODULES if m != "client_body" and f"--without-http_{m}_module" in text}


def nginx_conf(listen: str, upstream: str, workdir: Path, without: Container[str] = ()) -> str:
    """nginx.conf proxying everything on `listen` (host:port) to `upstream` (host:port) over pooled
    keep-alive connections, every file it writes kept under `workdir`."""
    temp_paths = "\n".join(
        f"    {m}_temp_path {workdir / (m + '_temp')};" for m in TEMP_PATH_MODULES if m not in without
    )
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log {workdir / "access.log"} combined buffer=64k flush=1s;
{temp_paths}
    # The harness's clients and the aiohttp servers never close a keep-alive connection after N requests;
    # nginx's default (1000) would add reconnects only to this target.
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    upstream bench_upstream {{
        server {upstream};
        keepalive 128;  # idle pooled connections, >= the harness's connections so none is closed midway
        keepalive_requests 1000000;
    }}

    server {{
        listen {listen};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;  # keep-alive to the upstream needs 1.1 and no "Connection: close"
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx_argv(binary: str, workdir: Path, conf: Path) -> list[str]:
    # -p: relative paths resolve in workdir; -e: the log for errors before the config is read.
    return [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
