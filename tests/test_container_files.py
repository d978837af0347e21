"""Dockerfile, .dockerignore, docker-compose.yml and the README's Docker commands: the invariants a user of
the container relies on.

No Docker engine is needed: the Dockerfile is read as text and docker-compose.yml with PyYAML. The one
behavioural check runs the image's HEALTHCHECK command itself, with the image's environment, against a
throwaway local HTTP server (tests/test_healthcheck.py runs the command against real gateways).
A full schema validation of the compose file runs only where the `compose-spec` package is installed;
without it, the manual check is `docker-compose -f docker-compose.yml config -q` (Debian's docker-compose).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.healthcheck import DEFAULT_TIMEOUT as HEALTHCHECK_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"

API_PORT = 8080
ADMIN_PORT = 9102


# --- Dockerfile parsing ----------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"final stage has no {keyword} instruction"
        return found[-1]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for inst in self.all("ENV"):
            for token in shlex.split(inst.args):
                key, sep, value = token.partition("=")
                assert sep, f"use the ENV KEY=VALUE form, not the legacy `ENV KEY VALUE`: {inst.args!r}"
                env[key] = value
        return env


def _logical_lines(text: str) -> list[str]:
    """Join backslash continuations; drop comments and blank lines, also inside continuations like Docker."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def exec_form(inst: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction; shell form would make /bin/sh PID 1 and eat SIGTERM."""
    try:
        value = json.loads(inst.args)
    except ValueError:
        pytest.fail(f"{inst.keyword} must use the exec (JSON array) form, got {inst.args!r}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), inst.args
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    args = stage.last("HEALTHCHECK").args
    _options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK must run a command: {args!r}"
    return exec_form(Instruction("HEALTHCHECK", command.strip()))


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


# --- compose parsing -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


@pytest.fixture(scope="module")
def gateway(compose: dict) -> dict:
    return compose["services"]["gateway"]


def interpolate_defaults(value: str) -> str:
    """What Compose substitutes when the variable is unset: ${VAR:-default} / ${VAR-default} -> default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def service_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- KEY=VALUE` form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: interpolate_defaults(str(v)) for k, v in env.items()}


@dataclass
class Published:
    host_ip: str | None
    host_port: str
    container_port: int


def published_ports(service: dict) -> list[Published]:
    result = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):  # long syntax
            result.append(
                Published(entry.get("host_ip"), str(entry.get("published", "")), int(entry["target"]))
            )
            continue
        spec = str(entry).split("/")[0]
        match = re.fullmatch(r"(?:(?P<ip>\[[^\]]+\]|[^:]+):)?(?:(?P<host>[^:]*):)?(?P<container>\d+)", spec)
        assert match, f"unparseable port entry {entry!r}"
        ip = match["ip"]
        if ip is not None and match["host"] is None:  # "HOST:CONTAINER": the first group was the host port
            ip, host = None, ip
        else:
            host = match["host"] or ""
        result.append(Published(ip.strip("[]") if ip else None, host, int(match["container"])))
    return result


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool


def mounts(service: dict) -> list[Mount]:
    result = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            result.append(Mount(entry.get("source", ""), entry["target"], bool(entry.get("read_only"))))
            continue
        source, target, *rest = str(entry).split(":")
        modes = rest[0].split(",") if rest else []
        result.append(Mount(source, target, "ro" in modes))
    return result


# --- Dockerfile ------------------------------------------------------------------------------------------


VENV = "/opt/venv"


def test_builds_with_the_legacy_builder_and_offline(stages: list[Stage]) -> None:
    """A `# syntax=` line makes BuildKit pull a frontend image; RUN --mount fails with DOCKER_BUILDKIT=0."""
    first = DOCKERFILE.read_text(encoding="utf-8").lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), first
    runs = [i.args for s in stages for i in s.all("RUN")]
    assert runs and not [r for r in runs if r.startswith("--mount") or " --mount" in r], runs
    # The legacy builder knows only COPY's --from and --chown.
    for inst in (i for s in stages for i in s.all("COPY")):
        assert all(o.split("=")[0] in ("--from", "--chown") for o in inst.args.split() if o.startswith("--"))


def test_gateway_is_installed_into_a_venv_in_a_builder_stage(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage build expected: a builder stage and a slim runtime stage"
    assert all("slim" in s.base for s in stages), [s.base for s in stages]
    builder_runs = [i.args for s in stages[:-1] for i in s.all("RUN")]
    assert any(f"venv --without-pip {VENV}" in r for r in builder_runs), builder_runs
    [install] = [r for r in builder_runs if "pip" in r and " install" in r]
    assert f"--python {VENV}/bin/python" in install and "--no-cache-dir" in install, install
    assert "[test]" not in install, install


def test_final_stage_copies_the_venv_without_wheels_pip_or_toolchain(
    stages: list[Stage], final: Stage
) -> None:
    copied = [i.args.split() for i in final.all("COPY") if i.args.startswith("--from")]
    # The same path as in the builder: the venv's scripts and pyvenv.cfg name it.
    assert [f"--from={stages[0].name}", VENV, VENV] in copied, copied
    # The same base image: the venv's python is a link to the base image's interpreter.
    assert final.base == stages[0].base
    assert final.env()["PATH"].startswith(f"{VENV}/bin:"), "voipbin-gateway must be found on PATH"
    runs = [i.args for i in final.all("RUN")]
    for run in runs:
        assert "pip" not in run and ".whl" not in run, f"the runtime stage installs nothing: {run}"
        assert not re.search(r"\b(gcc|build-essential|g\+\+|make)\b", run), (
            f"toolchain in runtime stage: {run}"
        )
    assert not final.all("ADD"), "ADD in the runtime stage (use COPY)"


def test_build_copies_what_setuptools_needs(stages: list[Stage]) -> None:
    """pyproject.toml names a readme; setuptools refuses to build the wheel if it is not in the build dir."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    readme = project.get("readme")
    readme = readme.get("file") if isinstance(readme, dict) else readme
    copied = " ".join(i.args for s in stages[:-1] for i in s.all("COPY"))
    for needed in ("pyproject.toml", "gateway", *([readme] if readme else [])):
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|$)", copied), f"builder stage does not COPY {needed}"


def test_runs_as_fixed_non_root_user(final: Stage) -> None:
    user = final.last("USER").args.split(":")[0]
    assert user not in ("root", "0"), "the final stage must not run as root"
    # Numeric, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd lookup.
    assert user.isdigit() and int(user) >= 1000, f"USER should be a fixed numeric uid, got {user!r}"


def test_listens_on_all_interfaces_inside_the_container(final: Stage) -> None:
    env = final.env()
    assert env.get("GATEWAY_LISTEN") == f"0.0.0.0:{API_PORT}"
    assert env.get("GATEWAY_ADMIN_LISTEN") == f"0.0.0.0:{ADMIN_PORT}"
    assert env.get("PYTHONUNBUFFERED") == "1"
    exposed = {p.split("/")[0] for i in final.all("EXPOSE") for p in i.args.split()}
    assert {str(API_PORT), str(ADMIN_PORT)} <= exposed


def test_entrypoint_and_default_command(final: Stage) -> None:
    assert exec_form(final.last("ENTRYPOINT")) == ["voipbin-gateway"]
    cmd = exec_form(final.last("CMD"))
    assert cmd[:1] == ["serve"]
    # No --listen in CMD: it would beat GATEWAY_LISTEN and make the ENV above dead text.
    assert not any(arg.startswith(("--listen", "--admin-listen")) for arg in cmd), cmd
    assert final.last("STOPSIGNAL").args == "SIGTERM"


def test_config_is_baked_in_where_gateway_config_points(final: Stage) -> None:
    config_path = final.env().get("GATEWAY_CONFIG")
    assert config_path and PurePosixPath(config_path).is_absolute()
    copies = [i.args.split() for i in final.all("COPY") if not i.args.startswith("--from")]
    assert ["config/gateway.yaml", config_path] in [c[-2:] for c in copies], copies


def test_healthcheck_runs_the_gateways_own_check(final: Stage) -> None:
    args = final.last("HEALTHCHECK").args
    for option in ("--interval", "--timeout", "--retries"):
        assert option in args, f"HEALTHCHECK without {option}: Docker's defaults (30s, 30s, 3) are too lax"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["voipbin-gateway"] == "gateway.cli:main"
    # Nothing after the subcommand: an --admin-listen or --config here would stop the check following the
    # config and GATEWAY_* variables that `serve` reads.
    assert healthcheck_command(final) == ["voipbin-gateway", "healthcheck"]
    # Docker cuts a check off at --timeout and records no reason; the command's own limit must come first,
    # with room for the interpreter's start and imports (0.3 s idle, several times that on a loaded host).
    timeout = re.search(r"--timeout=(\d+)s\b", args)
    assert timeout and int(timeout[1]) - HEALTHCHECK_TIMEOUT >= 2, args


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def run_image_healthcheck(final: Stage, admin_port: int) -> subprocess.CompletedProcess[bytes]:
    """The image's HEALTHCHECK command as the image runs it: with the image's GATEWAY_* variables, the repo
    config where GATEWAY_CONFIG points, and only the admin port moved to `admin_port`."""
    command = healthcheck_command(final)
    image_env = {k: v for k, v in final.env().items() if k.startswith("GATEWAY_")}
    image_env["GATEWAY_CONFIG"] = str(ROOT / "config" / "gateway.yaml")
    image_env["GATEWAY_ADMIN_LISTEN"] = image_env["GATEWAY_ADMIN_LISTEN"].replace(
        f":{ADMIN_PORT}", f":{admin_port}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | image_env
    return subprocess.run(
        [sys.executable, "-m", "gateway", *command[1:]], env=env, cwd=ROOT, capture_output=True, timeout=30
    )


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_reports_the_admin_status(final: Stage, status: int, healthy: bool) -> None:
    handler = type("Handler", (_Health,), {"status": status, "paths": []})
    # On 127.0.0.1 while the image's GATEWAY_ADMIN_LISTEN says 0.0.0.0: the check dials loopback.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_image_healthcheck(final, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) is healthy, result.stderr.decode()
    assert handler.paths == ["/healthz"]


def test_healthcheck_command_fails_when_nothing_listens(final: Stage) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and is now closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_image_healthcheck(final, port)
    assert result.returncode == 1
    assert result.stderr.decode().startswith(f"unhealthy: http://127.0.0.1:{port}/healthz: "), result.stderr


# --- .dockerignore ---------------------------------------------------------------------------------------


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything under a directory."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", body)
        )
        regex = regex.replace(".*/", "(.*/)?")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "README.md", "gateway/__init__.py", "gateway/proxy/x.py", "config/gateway.yaml"],
)
def test_dockerignore_keeps_build_inputs(ignore_patterns: list[str], path: str) -> None:
    assert not _dockerignore_excludes(path, ignore_patterns), (
        f".dockerignore drops {path}, the build needs it"
    )


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_x.py",
        "benchmarks/results.json",
        ".pytest_cache/v",
        "gateway/__pycache__/x.cpython-311.pyc",
        "dist/x.whl",
        ".env",
    ],
)
def test_dockerignore_drops_local_artefacts(ignore_patterns: list[str], path: str) -> None:
    assert _dockerignore_excludes(path, ignore_patterns), f".dockerignore sends {path} to the daemon"


def test_files_the_image_build_copies_exist(stages: list[Stage]) -> None:
    missing = []
    for stage in stages:
        for inst in stage.all("COPY"):
            if inst.args.startswith("--from"):
                continue
            *sources, _dest = inst.args.split()
            missing += [s for s in sources if not s.startswith("--") and not (ROOT / s).exists()]
    assert not missing, f"`docker build` would fail, not in the repo: {missing}"


# --- docker-compose.yml ----------------------------------------------------------------------------------


def test_compose_layout(compose: dict) -> None:
    assert "version" not in compose, "top-level `version:` is obsolete in the Compose Specification"
    assert {"gateway", "redis"} <= set(compose["services"])
    assert compose["services"]["redis"]["image"].startswith("redis:7")


def test_gateway_is_built_from_this_repo(gateway: dict) -> None:
    build = gateway["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert context in (".", "./")
    assert gateway.get("restart") == "unless-stopped"


def test_gateway_waits_for_a_healthy_redis(compose: dict, gateway: dict) -> None:
    depends = gateway["depends_on"]
    assert isinstance(depends, dict), "the list form of depends_on cannot wait for health"
    assert depends["redis"]["condition"] == "service_healthy"
    test = compose["services"]["redis"]["healthcheck"]["test"]
    assert "redis-cli" in test and "ping" in test, test


def test_redis_url_points_at_the_redis_service(compose: dict, gateway: dict) -> None:
    url = urlsplit(service_environment(gateway)["GATEWAY_REDIS_URL"])
    assert url.scheme == "redis"
    assert url.hostname == "redis" and url.hostname in compose["services"]
    assert url.port in (None, 6379)


def test_upstream_url_is_overridable_from_the_shell(gateway: dict) -> None:
    raw = str(gateway["environment"]["GATEWAY_UPSTREAM_URL"])
    assert raw.startswith("${GATEWAY_UPSTREAM_URL:-"), raw
    assert urlsplit(interpolate_defaults(raw)).scheme == "https"


def test_published_ports_are_loopback_only(compose: dict, gateway: dict) -> None:
    for name, service in compose["services"].items():
        for port in published_ports(service):
            assert port.host_ip == "127.0.0.1", f"{name}: {port} is reachable from the whole network"
    assert {p.container_port for p in published_ports(gateway)} == {API_PORT, ADMIN_PORT}


def test_config_mount_matches_gateway_config(final: Stage, gateway: dict) -> None:
    config_path = PurePosixPath(final.env()["GATEWAY_CONFIG"])
    [mount] = [m for m in mounts(gateway) if PurePosixPath(m.target) in (config_path, config_path.parent)]
    assert mount.read_only, "the gateway has no business writing its config"
    source = ROOT / mount.source
    if PurePosixPath(mount.target) == config_path.parent:
        source = source / config_path.name
    # The same repo file the image bakes in, so `docker compose up` and `docker run` agree.
    assert source.resolve() == (ROOT / "config" / "gateway.yaml").resolve()


def test_container_environment_is_accepted_by_the_gateway(final: Stage, gateway: dict) -> None:
    """Every GATEWAY_* name the image and compose set must be a config key: unknown ones abort startup."""
    from gateway.config import load_config

    env = {**final.env(), **service_environment(gateway)}
    env.pop("GATEWAY_CONFIG")  # a container path; the repo file it points at is loaded instead, if present
    repo_config = ROOT / "config" / "gateway.yaml"
    config = load_config(repo_config if repo_config.exists() else None, environ=env)
    assert config.listen == f"0.0.0.0:{API_PORT}"
    assert config.admin_listen == f"0.0.0.0:{ADMIN_PORT}"
    assert config.upstream.url == interpolate_defaults(str(gateway["environment"]["GATEWAY_UPSTREAM_URL"]))

    grace = re.fullmatch(r"(\d+)s", str(gateway.get("stop_grace_period", "10s")))
    assert grace, "stop_grace_period should be whole seconds, e.g. 35s"
    assert int(grace[1]) > config.server.drain_timeout, "docker stop would SIGKILL mid-drain"


def test_compose_file_validates_against_the_compose_spec() -> None:
    """The compose-spec test dependency validates against the Compose schema without a Docker engine."""
    import compose_spec

    parsed = compose_spec.PyCompose.from_yaml(COMPOSE.read_text(encoding="utf-8"))
    parsed.validate()
    assert {"gateway", "redis"} <= set(parsed.service_names())
    assert {"prometheus", "grafana", "jaeger"} <= set(parsed.service_names())


# --- docker-compose.yml: prometheus and grafana ----------------------------------------------------------

PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000


@pytest.fixture(scope="module")
def prometheus(compose: dict) -> dict:
    return compose["services"]["prometheus"]


@pytest.fixture(scope="module")
def grafana(compose: dict) -> dict:
    return compose["services"]["grafana"]


@pytest.mark.parametrize(
    "name, repository", [("prometheus", "prom/prometheus"), ("grafana", "grafana/grafana")]
)
def test_monitoring_images_are_pinned(compose: dict, name: str, repository: str) -> None:
    image = compose["services"][name]["image"]
    repo, _, tag = image.partition(":")
    assert repo == repository, image
    # A moving tag would let a new major version (and its config changes) arrive with any `docker pull`.
    assert tag and tag != "latest" and re.search(r"\d", tag), f"pin {name} to a version: {image}"


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_monitoring_mounts_are_read_only_repo_files(compose: dict, name: str) -> None:
    service_mounts = mounts(compose["services"][name])
    assert service_mounts, f"{name} mounts no config"
    for mount in service_mounts:
        assert mount.read_only, f"{name}: {mount.target} should be mounted :ro"
        assert mount.source.startswith("./config/"), f"{name}: {mount.source} is not repo config"
        assert (ROOT / mount.source).exists(), (
            f"{name}: {mount.source} does not exist, compose would create it"
        )
        assert PurePosixPath(mount.target).is_absolute()


@pytest.mark.parametrize("name, port", [("prometheus", PROMETHEUS_PORT), ("grafana", GRAFANA_PORT)])
def test_monitoring_ports_are_loopback_only(compose: dict, name: str, port: int) -> None:
    [published] = published_ports(compose["services"][name])
    assert published.host_ip == "127.0.0.1", f"{name} would be reachable from the whole network"
    assert published.container_port == port and published.host_port == str(port)


def test_prometheus_reads_the_mounted_config(prometheus: dict) -> None:
    command = prometheus["command"]
    assert isinstance(command, list), "list form, so no shell splits the flags"
    [config_file] = [a.split("=", 1)[1] for a in command if a.startswith("--config.file=")]
    [mount] = [m for m in mounts(prometheus) if PurePosixPath(m.target) in PurePosixPath(config_file).parents]
    assert (ROOT / mount.source / PurePosixPath(config_file).relative_to(mount.target)).is_file()
    assert any(a.startswith("--storage.tsdb.path=") for a in command)


def test_grafana_lets_anonymous_users_view_only(grafana: dict) -> None:
    env = service_environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "anonymous visitors must not edit or administer"
    assert "GF_AUTH_DISABLE_LOGIN_FORM" not in env, "the admin must still be able to log in"
    assert not any(isinstance(v, bool) for v in (grafana.get("environment") or {}).values()), (
        "quote booleans: Compose only accepts strings for environment values"
    )


def test_grafana_is_provisioned_and_starts_after_prometheus(grafana: dict) -> None:
    depends = grafana["depends_on"]
    assert "prometheus" in (depends if isinstance(depends, list) else list(depends))
    targets = {m.target for m in mounts(grafana)}
    assert "/etc/grafana/provisioning/datasources" in targets
    assert "/etc/grafana/provisioning/dashboards" in targets
    assert "/var/lib/grafana/dashboards" in targets


def test_redis_persists_quotas_overrides_and_keys_in_a_named_volume(compose: dict) -> None:
    """Monthly quota counts, team overrides and issued access keys live in this Redis: a restart must not
    reset them."""
    redis_service = compose["services"]["redis"]
    command = [str(part) for part in redis_service["command"]]
    assert command[command.index("--appendonly") + 1] == "yes", command
    [data] = [m for m in mounts(redis_service) if m.target == "/data"]  # the image's working directory
    assert not data.read_only
    assert data.source in (compose.get("volumes") or {}), "a named volume outlives the container"


def test_compose_keeps_the_images_healthcheck(final: Stage, gateway: dict) -> None:
    """docker-compose.yml may leave the image's HEALTHCHECK in force or restate it, never weaken it."""
    check = gateway.get("healthcheck")
    if check is not None:
        assert not check.get("disable"), "the gateway's health check is switched off"
        assert check["test"] == ["CMD", *healthcheck_command(final)], check


# --- docker-compose.yml: jaeger, and exemplars from a latency panel to a trace ----------------------------

JAEGER_UI_PORT = 16686
OTLP_HTTP_PORT = 4318
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"
DATASOURCES_DIR = ROOT / "config" / "grafana" / "provisioning" / "datasources"
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "voipbin-gateway.json"
# What the gateway's request and upstream histograms carry exemplars on.
LATENCY_BUCKETS = re.compile(r"\bgateway_(?:request|upstream)_duration_seconds_bucket\b")


@pytest.fixture(scope="module")
def jaeger(compose: dict) -> dict:
    return compose["services"]["jaeger"]


@pytest.fixture(scope="module")
def provisioned_datasources() -> list[dict]:
    """Every data source Grafana provisions: all YAML files of the folder it reads, as Grafana does."""
    sources = []
    for path in sorted(DATASOURCES_DIR.glob("*.y*ml")):
        sources += yaml.safe_load(path.read_text(encoding="utf-8")).get("datasources") or []
    return sources


def test_jaeger_is_a_pinned_v2_all_in_one(jaeger: dict) -> None:
    repository, _, tag = jaeger["image"].partition(":")
    assert repository == "jaegertracing/jaeger", "v2 (the OTLP-native all-in-one) is jaegertracing/jaeger"
    # A moving tag (latest, 2) would let a new release and its config changes arrive with any `docker pull`.
    assert re.fullmatch(r"2\.\d+\.\d+", tag), f"pin Jaeger to a 2.x.y release: {jaeger['image']}"
    assert jaeger.get("restart") == "unless-stopped"
    # In-memory storage and the built-in all-in-one config: nothing to mount, nothing to keep.
    assert not jaeger.get("volumes") and not jaeger.get("command"), "expected the image's all-in-one defaults"


def test_jaeger_publishes_only_its_ui_on_loopback(jaeger: dict) -> None:
    [published] = published_ports(jaeger)
    assert published.host_ip == "127.0.0.1", "the Jaeger UI would be reachable from the whole network"
    assert published.container_port == JAEGER_UI_PORT and published.host_port == str(JAEGER_UI_PORT)
    # The collector binds localhost inside the container unless told otherwise: the gateway could not
    # reach it from its own container.
    assert service_environment(jaeger).get("JAEGER_LISTEN_HOST") == "0.0.0.0"


def test_gateway_exports_its_spans_to_jaeger(compose: dict, gateway: dict) -> None:
    from gateway.config import load_config

    raw = gateway["environment"]
    assert raw["GATEWAY_TRACING_ENABLED"] == "true", "quoted: Compose only accepts strings for environment"
    endpoint = urlsplit(service_environment(gateway)["GATEWAY_TRACING_ENDPOINT"])
    assert endpoint.scheme == "http" and endpoint.hostname == "jaeger"
    assert endpoint.hostname in compose["services"]
    assert endpoint.port == OTLP_HTTP_PORT and endpoint.path == "/v1/traces", "OTLP/HTTP traces endpoint"
    # Started, not healthy: an unreachable collector only costs spans, never the gateway's start.
    jaeger_dependency = gateway["depends_on"]["jaeger"]
    assert jaeger_dependency["condition"] == "service_started", jaeger_dependency

    env = {k: v for k, v in service_environment(gateway).items() if k.startswith("GATEWAY_TRACING_")}
    config = load_config(None, environ=env)
    assert config.tracing.enabled is True
    assert config.tracing.endpoint == f"http://jaeger:{OTLP_HTTP_PORT}/v1/traces"


def test_grafana_starts_jaeger_for_its_trace_links(grafana: dict) -> None:
    depends = grafana["depends_on"]
    assert "jaeger" in (depends if isinstance(depends, list) else list(depends))


def test_prometheus_stores_exemplars_from_an_openmetrics_scrape(prometheus: dict) -> None:
    features = {
        feature.strip()
        for arg in prometheus["command"]
        if arg.startswith("--enable-feature=")
        for feature in arg.split("=", 1)[1].split(",")
    }
    assert "exemplar-storage" in features, "Prometheus drops scraped exemplars without this feature flag"

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "voipbin-gateway"]
    # Prometheus 3's default (without native histograms) already puts OpenMetrics 1.0.0 first.
    default = ["OpenMetricsText1.0.0", "OpenMetricsText0.0.1", "PrometheusText1.0.0", "PrometheusText0.0.4"]
    protocols = job.get("scrape_protocols", config.get("global", {}).get("scrape_protocols", default))
    # Only the OpenMetrics text format carries exemplars, and the gateway picks the first one it serves.
    assert protocols[0].startswith("OpenMetricsText"), protocols


def test_jaeger_data_source_is_provisioned(provisioned_datasources: list[dict], compose: dict) -> None:
    uids = [source["uid"] for source in provisioned_datasources]
    assert len(uids) == len(set(uids)), f"duplicate data source uids: {uids}"
    assert sum(bool(source.get("isDefault")) for source in provisioned_datasources) == 1
    [source] = [s for s in provisioned_datasources if s["type"] == "jaeger"]
    assert source["uid"] == "jaeger", "fixed: the Prometheus data source's exemplar link names it"
    assert source["access"] == "proxy", "the browser cannot resolve the compose service name"
    url = urlsplit(source["url"])
    assert url.hostname == "jaeger" and url.hostname in compose["services"]
    assert url.port == JAEGER_UI_PORT, "Grafana reads traces from the query service's HTTP API"


def test_exemplar_trace_ids_link_to_a_provisioned_data_source(provisioned_datasources: list[dict]) -> None:
    by_uid = {source["uid"]: source for source in provisioned_datasources}
    [prometheus_source] = [s for s in provisioned_datasources if s["type"] == "prometheus"]
    destinations = prometheus_source["jsonData"]["exemplarTraceIdDestinations"]
    for destination in destinations:
        if "datasourceUid" in destination:  # the other kind is a plain URL
            assert destination["datasourceUid"] in by_uid, f"link to an unknown data source: {destination}"
    # The exemplar label the gateway writes (32 lowercase hex) must be the one Grafana turns into a link.
    [trace_link] = [d for d in destinations if d["name"] == "trace_id"]
    assert by_uid[trace_link["datasourceUid"]]["type"] == "jaeger"


def test_latency_panels_show_exemplars() -> None:
    """Exemplars are drawn by timeseries panels only: each of their queries on the request or upstream
    latency buckets asks for them, so a slow request's dot opens its trace."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    targets = [
        (panel["title"], target)
        for panel in panels
        if panel.get("type") == "timeseries"
        for target in panel.get("targets", [])
        if LATENCY_BUCKETS.search(target.get("expr", ""))
    ]
    assert len({title for title, _ in targets}) >= 3, "expected the latency timeseries panels"
    missing = [f"{title} {t['refId']}" for title, t in targets if t.get("exemplar") is not True]
    assert not missing, f"latency queries without exemplars: {missing}"


# --- README ----------------------------------------------------------------------------------------------


def readme_docker_section() -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Docker\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, "README has no '## Docker' section"
    return section[1]


def readme_docker_commands() -> list[str]:
    """The shell commands in the README's "Docker" section, backslash continuations joined."""
    blocks = re.findall(
        r"^```(?:sh|bash|shell)?\n(.*?)^```", readme_docker_section(), re.MULTILINE | re.DOTALL
    )
    return [
        " ".join(line.split("#")[0].strip() for line in command.split("\\\n"))
        for block in blocks
        for command in re.split(r"(?<!\\)\n", block)
        if command.strip()
    ]


def test_readme_docker_run_publishes_ports_on_loopback_only() -> None:
    """Docker's published ports bypass host firewalls: a bare `-p 9102:9102` would put /metrics on the
    network, and a README command is what gets copied."""
    runs = [c for c in readme_docker_commands() if re.search(r"\bdocker run\b", c)]
    assert runs, "the Docker section shows no `docker run`"
    published = [p for run in runs for p in re.findall(r"(?:^|\s)(?:-p|--publish)[ =](\S+)", run)]
    assert published, runs
    for port in published:
        assert port.startswith("127.0.0.1:"), f"published on every interface: {port}"
    assert f"127.0.0.1:{ADMIN_PORT}:{ADMIN_PORT}" in published
    assert f"127.0.0.1:{API_PORT}:{API_PORT}" in published


def test_readme_shows_both_builders_the_healthcheck_read_only_and_reload() -> None:
    commands = readme_docker_commands()
    builds = [c for c in commands if re.search(r"\bdocker build\b", c)]
    assert any("DOCKER_BUILDKIT=0" in b for b in builds), builds
    assert any("DOCKER_BUILDKIT=0" not in b for b in builds), builds
    assert any("voipbin-gateway healthcheck" in c for c in commands)
    assert any("--read-only" in c for c in commands)
    assert re.search(r"`docker kill --signal[ =]HUP \w+`", readme_docker_section())
