"""The Grafana dashboard, its provisioning and the Prometheus scrape config, checked against the real gateway.

Static half: the dashboard JSON is a valid, provisionable Grafana dashboard whose every panel queries the
provisioned datasource, and docker-compose.yml mounts the files where the provisioning expects them.

Live half: an in-process gateway serves some traffic (a 200, a 404 on no route, an upstream failure, a
missing credential, a rate-limited route), then its admin listener's GET /metrics must expose every metric
the dashboard queries, with the labels the queries filter and group on. Only the scrape text is inspected,
never gateway internals, so a renamed metric or label breaks this test instead of silently blanking a panel.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from test_container_files import mounts, published_ports, service_environment
from test_lifecycle import (  # the subprocess gateway machinery, fixtures included
    Spawn,
    fetch,
    session,  # noqa: F401
    spawn,  # noqa: F401
    write_config,
)
from upstream_server import UpstreamServer

from gateway.observability.metrics import MULTIPROC_ENV

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "voipbin-gateway.json"
DATASOURCES = ROOT / "config" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = ROOT / "config" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
PROMETHEUS = ROOT / "config" / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"

DASHBOARD_UID = "voipbin-gateway"
ADMIN_PORT = 9102
ALLOWED_UNITS = {"reqps", "s", "short", "bytes", "Bps", "percentunit", "ops"}


# --- loading ---------------------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those folded inside collapsed rows."""
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in data_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else str(query or "")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    [source] = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    return source


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))


# --- PromQL: which metrics and labels an expression uses -------------------------------------------------

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "le",
}  # fmt: skip
PROMQL_FUNCTIONS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "limitk", "limit_ratio", "rate", "irate", "increase", "delta", "idelta", "deriv", "resets",
    "changes", "histogram_quantile", "histogram_fraction", "histogram_count", "histogram_sum",
    "histogram_avg", "label_replace", "label_join", "vector", "scalar", "absent", "absent_over_time",
    "abs", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "exp", "ln", "log2", "log10", "sqrt",
    "sort", "sort_desc", "time", "timestamp", "predict_linear", "holt_winters", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "quantile_over_time", "stddev_over_time", "present_over_time", "label_values", "query_result",
}  # fmt: skip
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus attaches at scrape time, or that only exist inside a histogram: never in the
# gateway's own label sets, so the label check below does not look for them.
TARGET_LABELS = {"instance", "job", "le", "__name__"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_NAME_MATCHER = re.compile(r"__name__\s*=\s*\"([A-Za-z_:][A-Za-z0-9_:]*)\"")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()")


def base_metric_name(name: str) -> str:
    """Histogram series (_bucket/_sum/_count) name their family; counters keep their _total."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _without_strings_and_variables(expr: str) -> str:
    expr = re.sub(r"#[^\n]*", " ", expr)  # PromQL comments
    expr = _STRING.sub('""', expr)
    return _GRAFANA_VARIABLE.sub(" ", expr)


def metric_names_in_expr(expr: str) -> set[str]:
    """Metric (family) names an expression selects: not functions, keywords, labels, durations or $vars."""
    if expr.strip().startswith("label_values(") and expr.strip().endswith(")"):
        # label_values(selector, label) reads a metric; label_values(label) reads none.
        selector, comma, _label = expr.strip()[len("label_values(") : -1].rpartition(",")
        return metric_names_in_expr(selector) if comma else set()
    names = {base_metric_name(m) for m in _NAME_MATCHER.findall(expr)}
    expr = _without_strings_and_variables(expr)
    expr = _MATCHERS.sub(" ", expr)  # label matchers; strings are gone, so braces do not nest
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery durations
    expr = _GROUPING.sub(" ", expr)  # label lists of by/without/on/ignoring/group_*
    for name in _IDENTIFIER.findall(expr):
        if name.lower() not in PROMQL_KEYWORDS and name not in PROMQL_FUNCTIONS:
            names.add(base_metric_name(name))
    return names


def label_names_in_expr(expr: str) -> set[str]:
    """Labels an expression matches on or groups by."""
    expr = _without_strings_and_variables(expr)
    labels = {label for block in _MATCHERS.findall(expr) for label in _MATCHER_LABEL.findall(block)}
    for _keyword, names in _GROUPING.findall(expr):
        labels.update(n.strip() for n in names.split(",") if n.strip())
    return labels


def metric_names_in_dashboard() -> set[str]:
    """Every metric name the dashboard's panels and template variables query."""
    dashboard = load_dashboard()
    names: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        names |= metric_names_in_expr(expr)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            names |= metric_names_in_expr(variable_query(variable))
    return names


@pytest.mark.parametrize(
    "expr, expected",
    [
        (
            'sum by (route, code) (rate(gateway_requests_total{route=~"$route", code=~"5.."}'
            "[$__rate_interval]))",
            {"gateway_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket"
            "[$__rate_interval])))",
            {"gateway_request_duration_seconds"},
        ),
        (
            "sum(rate(gateway_upstream_duration_seconds_sum[5m])) / "
            "sum(rate(gateway_upstream_duration_seconds_count[5m]))",
            {"gateway_upstream_duration_seconds"},
        ),
        (
            "max by (instance, version) (gateway_build_info) * on (instance) group_left (hash) "
            "gateway_config_info",
            {"gateway_build_info", "gateway_config_info"},
        ),
        (
            '(sum(rate(x_total{code=~"5..", route="by"}[1m] offset 1h)) or vector(0)) > bool 1e3',
            {"x_total"},
        ),
        (
            "min without (pid) (gateway_redis_up) == 0 unless on() absent(gateway_build_info)",
            {"gateway_redis_up", "gateway_build_info"},
        ),
        ('sum(rate({__name__="gateway_requests_total", route="api"}[1m]))', {"gateway_requests_total"}),
        (
            'label_replace(up{job="voipbin-gateway"}, "host", "$1", "instance", "(.*):\\\\d+")',
            {"up"},
        ),
        ("label_values(gateway_requests_total, route)", {"gateway_requests_total"}),
        ('label_values(gateway_requests_total{code="200", method="GET"}, route)', {"gateway_requests_total"}),
        ("label_values(route)", set()),
        ("histogram_quantile($quantile, sum by (le) (rate(a_bucket[${__rate_interval}])))", {"a"}),
    ],
)
def test_metric_name_extractor(expr: str, expected: set[str]) -> None:
    assert metric_names_in_expr(expr) == expected


def test_label_name_extractor() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (route, le) (rate(gateway_request_duration_seconds_bucket"
        '{route=~"$route", code_class!="5xx"}[$__rate_interval]))) * on(instance) group_left(hash) x'
    )
    assert label_names_in_expr(expr) == {"route", "le", "code_class", "instance", "hash"}


def test_dashboard_uses_the_gateway_metrics() -> None:
    names = metric_names_in_dashboard()
    assert names, "no metric names found in the dashboard"
    assert all(n.startswith("gateway_") for n in names), sorted(names)
    # One panel family each: traffic, latency, upstream, errors, auth, rate limits, Redis, capacity, build.
    assert {
        "gateway_requests_total",
        "gateway_request_duration_seconds",
        "gateway_upstream_duration_seconds",
        "gateway_upstream_errors_total",
        "gateway_upstream_target_requests_total",
        "gateway_upstream_target_failures_total",
        "gateway_upstream_target_ejected",
        "gateway_upstream_target_ejections_total",
        "gateway_auth_total",
        "gateway_ratelimit_decisions_total",
        "gateway_redis_duration_seconds",
        "gateway_redis_errors_total",
        "gateway_redis_up",
        "gateway_in_flight_requests",
        "gateway_ratelimit_local_keys",
        "gateway_ratelimit_local_evictions_total",
        "gateway_build_info",
        "gateway_config_info",
        "gateway_websocket_connections",
        "gateway_websocket_messages_total",
        "gateway_websocket_bytes_total",
        "gateway_websocket_closes_total",
        "gateway_websocket_duration_seconds",
    } <= names


# --- the dashboard JSON ----------------------------------------------------------------------------------


def test_dashboard_is_a_provisionable_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == DASHBOARD_UID, "a fixed uid keeps links and the home dashboard stable"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41, dashboard["schemaVersion"]
    assert dashboard.get("id") is None, "provisioned dashboards must not carry a database id"
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0 and grid["y"] >= 0, panel["title"]


def test_every_panel_has_title_description_datasource_and_a_query(
    dashboard: dict[str, Any], datasource: dict[str, Any]
) -> None:
    panels = data_panels(dashboard)
    assert len(panels) >= 10
    for panel in panels:
        title = panel.get("title")
        assert title, f"panel {panel.get('id')} has no title"
        assert panel.get("description", "").strip(), f"{title}: no description"
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, title
        targets = panel.get("targets") or []
        assert targets, f"{title}: no queries"
        assert len({t["refId"] for t in targets}) == len(targets), f"{title}: duplicate refIds"
        for target in targets:
            assert target.get("expr", "").strip(), f"{title}: target {target.get('refId')} has no expr"
            if "datasource" in target:
                assert target["datasource"]["uid"] == datasource["uid"], title


def test_panels_have_sensible_units(dashboard: dict[str, Any]) -> None:
    for panel in data_panels(dashboard):
        if panel["type"] == "table":
            continue
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit in ALLOWED_UNITS, f"{panel['title']}: unit {unit!r}"


def test_rates_use_the_rate_interval(dashboard: dict[str, Any]) -> None:
    for expr in dashboard_exprs(dashboard):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", f"fixed or missing rate window in {expr}"


def test_quantiles_keep_the_le_label(dashboard: dict[str, Any]) -> None:
    quantiles = 0
    for expr in dashboard_exprs(dashboard):
        for grouping in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,\s*sum by \(([^)]*)\)", expr):
            quantiles += 1
            assert "le" in {g.strip() for g in grouping.split(",")}, expr
        assert expr.count("histogram_quantile(") == len(
            re.findall(r"histogram_quantile\(\s*[\d.]+\s*,\s*sum by \(", expr)
        ), f"histogram_quantile without `sum by (..., le)`: {expr}"
    assert quantiles >= 5


def test_route_variable(dashboard: dict[str, Any], datasource: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    route = variables["route"]
    assert route["type"] == "query"
    assert route["datasource"]["uid"] == datasource["uid"]
    assert re.fullmatch(r"label_values\(\s*gateway_requests_total\s*,\s*route\s*\)", variable_query(route))
    assert route["multi"] and route["includeAll"] and route["allValue"] == ".*"
    exprs = dashboard_exprs(dashboard)
    assert sum('route=~"$route"' in e for e in exprs) >= 5
    # Multi-value and All expand to a regex; an exact-match selector would match nothing.
    assert not [e for e in exprs if re.search(r'route\s*(=|!=)\s*"\$route"', e)]


def test_status_code_filters_match_three_digit_codes(dashboard: dict[str, Any]) -> None:
    """`code` holds the status (e.g. 502); the class form (5xx) lives in code_class on the histogram."""
    for expr in dashboard_exprs(dashboard):
        for value in re.findall(r'\bcode\s*=~\s*"([^"]*)"', expr):
            assert re.fullmatch(r"[1-5]\.\.", value), expr
        for value in re.findall(r'\bcode_class\s*[!=]~?\s*"([^"]*)"', expr):
            assert re.fullmatch(r"[1-5]xx", value), expr


# --- provisioning and compose ----------------------------------------------------------------------------


def _service_mounts(compose: dict[str, Any], service: str) -> dict[PurePosixPath, Path]:
    return {
        PurePosixPath(m.target): (ROOT / m.source).resolve() for m in mounts(compose["services"][service])
    }


def _host_path(mounted: dict[PurePosixPath, Path], container_path: str) -> Path:
    """Where a container path of a service lives in the repo, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in sorted(mounted.items(), key=lambda item: -len(item[0].parts)):
        if path == target or target in path.parents:
            return source.joinpath(*path.parts[len(target.parts) :])
    raise AssertionError(f"{container_path} is not inside any mount: {sorted(map(str, mounted))}")


def test_datasource_provisioning(
    datasource: dict[str, Any], compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    assert datasource["type"] == "prometheus"
    assert datasource["uid"] == "prometheus"
    assert datasource["isDefault"] is True
    url = urlsplit(datasource["url"])
    assert url.hostname in compose["services"], "the datasource must name the compose service"
    container_ports = {p.container_port for p in published_ports(compose["services"][url.hostname])}
    assert url.port in container_ports, f"{datasource['url']} is not the port Prometheus listens on"
    # $__rate_interval is derived from timeInterval: it has to be Prometheus' real scrape interval.
    interval = prometheus_config["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == interval


def test_compose_mounts_the_provisioning_grafana_reads(compose: dict[str, Any]) -> None:
    mounted = _service_mounts(compose, "grafana")
    provisioning = PurePosixPath("/etc/grafana/provisioning")
    assert _host_path(mounted, str(provisioning / "datasources" / DATASOURCES.name)) == DATASOURCES.resolve()
    assert _host_path(mounted, str(provisioning / "dashboards" / PROVIDERS.name)) == PROVIDERS.resolve()

    [provider] = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))["providers"]
    assert provider["type"] == "file"
    dashboards_dir = _host_path(mounted, provider["options"]["path"])
    assert dashboards_dir == DASHBOARD.parent.resolve()
    assert (dashboards_dir / DASHBOARD.name).is_file()

    home = service_environment(compose["services"]["grafana"]).get(
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    )
    if home:
        assert _host_path(mounted, home) == DASHBOARD.resolve()


def test_prometheus_config_scrapes_the_gateway(
    prometheus_config: dict[str, Any], compose: dict[str, Any]
) -> None:
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    job = jobs["voipbin-gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", prometheus_config["global"]["scrape_interval"]) == "15s"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"gateway:{ADMIN_PORT}"]
    assert "gateway" in compose["services"]
    assert ADMIN_PORT in {p.container_port for p in published_ports(compose["services"]["gateway"])}
    # The compose service reads exactly this file.
    command = compose["services"]["prometheus"]["command"]
    [config_file] = [arg.split("=", 1)[1] for arg in command if arg.startswith("--config.file=")]
    assert _host_path(_service_mounts(compose, "prometheus"), config_file) == PROMETHEUS.resolve()


# --- the live check: the dashboard's metrics against a real scrape ---------------------------------------


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_SAMPLE_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Scrape:
    """The Prometheus text exposition (0.0.4 or OpenMetrics) as metric families and samples."""

    def __init__(self, text: str, status: int = 200) -> None:
        self.status = status
        self.text = text
        self.families: set[str] = set()
        self.samples: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.values: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split()
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    self.families.add(parts[2])
                    if parts[1] == "TYPE" and parts[3:4] == ["counter"]:
                        # OpenMetrics names a counter family without its _total; queries use the sample name.
                        self.families.add(parts[2].removesuffix("_total") + "_total")
                continue
            match = _SAMPLE.match(line)
            if match:
                labels = dict(_SAMPLE_LABEL.findall(match[2] or ""))
                self.samples[match[1]].append(labels)
                self.values[match[1]].append((labels, float(match[3])))

    def series_of(self, metric: str) -> list[dict[str, str]]:
        """Samples of a metric as the dashboard names it (histograms by base name, counters with _total)."""
        return [
            labels for suffix in ("", *HISTOGRAM_SUFFIXES) for labels in self.samples.get(metric + suffix, [])
        ]

    def total(self, sample_name: str, **labels: str) -> float:
        """Sum of the samples of one series name whose labels include `labels`."""
        return sum(v for got, v in self.values.get(sample_name, []) if labels.items() <= got.items())

    def has(self, metric: str) -> bool:
        return metric in self.families or bool(self.series_of(metric))

    def require_ok(self) -> None:
        assert self.status == 200, f"GET /metrics on the admin listener answered {self.status}"
        assert self.families or self.samples, "GET /metrics answered 200 without any metric"


def missing_from(scrape: Scrape) -> list[str]:
    return sorted(name for name in metric_names_in_dashboard() if not scrape.has(name))


TRAFFIC_ROUTES = [
    # Names no other test uses: metrics live in the process-wide registry, shared by every test's gateway.
    {"name": "dash-ok", "prefix": "/echo", "auth": "none"},
    {"name": "dash-broken", "prefix": "/reset", "auth": "none"},
    {"name": "dash-private", "prefix": "/private", "auth": "required"},
    {"name": "dash-pooled", "prefix": "/bytes", "auth": "none", "pool": "dash-pool"},
    {"name": "dash-limited", "prefix": "/status", "auth": "none", "rate_limit": ["tight"]},
    {"name": "dash-ws", "prefix": "/ws", "auth": "none", "websocket": True},
]
RATE_LIMIT = {
    "policies": {
        "tight": {"key": ["ip"], "rate": 0.1, "burst": 1, "scope": "shared", "on_redis_error": "local"},
    },
}


@pytest.fixture
async def scrape(upstream, make_gateway, client, redis_url) -> Scrape:
    """GET /metrics from a gateway that served a 200, a 404, a 502 and a 401 (plus rate-limited requests)
    and relayed one WebSocket stream."""
    gw = await make_gateway(
        upstream.url,
        routes=TRAFFIC_ROUTES,
        rate_limit=RATE_LIMIT,
        redis={"url": redis_url},
        upstream_pools={"dash-pool": {"targets": [{"url": upstream.url}]}},
    )
    expected = [
        ("GET", "/echo/hello", 200),
        ("GET", "/no/route/here", 404),
        ("POST", "/reset", 502),
        ("GET", "/private/thing", 401),
        ("GET", "/bytes/2", 200),  # through an upstream pool: the per-target series
    ]
    for method, path, status in expected:
        async with client.request(method, f"{gw.url}{path}") as resp:
            await resp.read()
            assert resp.status == status, f"{method} {path}"
    async with client.ws_connect(f"{gw.url}/ws") as ws:  # the upstream echoes; the client closes (1000)
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
    for _ in range(3):  # a burst of 1: the second and third are over the limit once rate limiting is on
        async with client.get(f"{gw.url}/status/200") as resp:
            await resp.read()

    # Metrics are recorded as each response finishes, which may be a moment after the client has it all.
    deadline = asyncio.get_running_loop().time() + 2.0
    while True:
        async with client.get(f"{gw.admin_url}/metrics") as resp:
            result = Scrape(await resp.text(), resp.status)
        if result.status != 200:
            return result  # the tests report it
        # The last request sent, so everything before it has been recorded too.
        settled = any(s.get("route") == "dash-limited" for s in result.series_of("gateway_requests_total"))
        # A stream is counted as closed once the relay has closed both sides, after the client's close.
        settled &= any(
            s.get("route") == "dash-ws" for s in result.series_of("gateway_websocket_closes_total")
        )
        if (settled and not missing_from(result)) or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


async def test_every_dashboard_metric_is_exposed_by_the_gateway(scrape: Scrape) -> None:
    """THE check: a panel whose metric the gateway does not export would stay empty forever."""
    scrape.require_ok()
    missing = missing_from(scrape)
    assert not missing, f"the dashboard queries metrics GET /metrics does not expose: {missing}"
    assert "gateway_build_info" in scrape.samples and "gateway_config_info" in scrape.samples


async def test_dashboard_labels_exist_on_the_scraped_series(
    scrape: Scrape, dashboard: dict[str, Any]
) -> None:
    """Every label a query filters or groups on is on the series of (one of) the metrics it reads."""
    scrape.require_ok()
    problems = []
    for expr in dashboard_exprs(dashboard):
        labels = label_names_in_expr(expr) - TARGET_LABELS
        series = [s for metric in metric_names_in_expr(expr) for s in scrape.series_of(metric)]
        if not series:
            continue  # no samples yet (e.g. no Redis call happened): the name check above covers it
        present = set().union(*series)
        problems += [f"{label!r} in {expr}" for label in sorted(labels - present)]
    assert not problems, "labels no scraped series carries:\n" + "\n".join(problems)


async def test_driven_traffic_lands_where_the_panels_look(scrape: Scrape) -> None:
    """The 200, the 404 (route `unmatched`), the 502 (upstream reset) and the 401 the fixture sent."""
    scrape.require_ok()
    requests = scrape.series_of("gateway_requests_total")
    for route, code in [
        ("dash-ok", "200"),
        ("unmatched", "404"),
        ("dash-broken", "502"),
        ("dash-private", "401"),
    ]:
        assert any(s.get("route") == route and s.get("code") == code for s in requests), (route, code)
    errors = scrape.series_of("gateway_upstream_errors_total")
    assert any(s.get("route") == "dash-broken" and s.get("kind") == "reset" for s in errors), errors
    durations = scrape.series_of("gateway_request_duration_seconds")
    classes = {s.get("code_class") for s in durations if s.get("route", "").startswith("dash-")}
    assert {"2xx", "4xx", "5xx"} <= classes, classes
    assert any(s.get("result") == "failure" for s in scrape.series_of("gateway_auth_total"))
    limited = scrape.total("gateway_ratelimit_decisions_total", policy="tight", decision="limited")
    assert limited >= 1, "two requests over a burst of 1 should show in the 429s-by-policy panel"
    assert scrape.total("gateway_websocket_messages_total", route="dash-ws", direction="to_client") >= 1
    closes = scrape.series_of("gateway_websocket_closes_total")
    assert {"route": "dash-ws", "closed_by": "client", "code": "1000"} in closes, closes


async def test_redis_panels_show_a_healthy_redis(scrape: Scrape) -> None:
    """The fixture's `tight` policy is shared, so its decisions went through the (healthy) Redis: the Redis
    panels must show it up and with round trips, not DOWN and empty."""
    scrape.require_ok()
    assert scrape.total("gateway_ratelimit_decisions_total", policy="tight", decision="fallback") == 0
    up = [value for _labels, value in scrape.values.get("gateway_redis_up", [])]
    assert up and min(up) == 1, f"gateway_redis_up is {up} while Redis answers"
    assert scrape.total("gateway_redis_duration_seconds_count") >= 1, "no Redis round trip was timed"


# --- before any traffic: every panel's series already exist, at 0 ----------------------------------------
#
# A series that first appears at 1 has rate() 0, so a panel would stay flat through the first upstream error,
# 429 or auth failure. The gateway creates every label set it can produce at 0 when it starts
# (gateway/observability/known_series.py); this scrapes a fresh gateway process (a registry no other test
# touched) before it has served anything, once on its own and once with workers (prometheus-client's
# multiprocess files), and holds every selector of every panel against that scrape.

# Not counters at 0 by nature: what they read before any traffic is their whole point.
ZERO_EXEMPT = {
    "gateway_build_info": "1: labels the running version",
    "gateway_config_info": "1 for the loaded config's hash",
    "gateway_redis_up": "1 while Redis answers",
    "gateway_ratelimit_local_max_keys": "rate_limit.local_max_keys as configured",
}

# A name not preceded by a word character, `.` (a number) or `$` (a variable), with its braces if any (their
# strings may hold any character), and not followed by `(` (a function).
_SELECTOR = re.compile(
    r'(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?(?!\s*\()'
)
_SELECTOR_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


class Selector:
    """One instant-vector selector of a query: a sample name and its label matchers, with the dashboard's
    variables already replaced by the value "All" gives them."""

    def __init__(self, name: str, matchers: list[tuple[str, str, str]]) -> None:
        self.name = name
        self.matchers = matchers

    def matches(self, labels: dict[str, str]) -> bool:
        for label, op, value in self.matchers:
            got = labels.get(label, "")  # PromQL: a missing label matches as ""
            equal = re.fullmatch(value, got) is not None if op in ("=~", "!~") else got == value
            if equal != (op in ("=", "=~")):
                return False
        return True

    def __repr__(self) -> str:
        return self.name + "{" + ", ".join(f'{lbl}{op}"{v}"' for lbl, op, v in self.matchers) + "}"


def all_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """Template variable → what selecting "All" makes of it (its allValue, e.g. `.*`)."""
    return {
        v["name"]: v["allValue"] for v in dashboard.get("templating", {}).get("list", []) if "allValue" in v
    }


def selectors_in_expr(expr: str, variables: dict[str, str]) -> list[Selector]:
    """The metric selectors of a query (not functions, keywords, grouping labels or durations)."""
    names = metric_names_in_expr(expr)
    without_ranges = re.sub(r"\[[^\]]*\]", " ", expr)
    found = []
    for name, block in _SELECTOR.findall(without_ranges):
        if base_metric_name(name) not in names:
            continue
        matchers = []
        inner = block[1:-1].strip()
        position = 0
        while position < len(inner):
            match = _SELECTOR_MATCHER.match(inner, position)
            assert match, f"cannot read the label matchers {block} in {expr}"
            label, op, value = match.groups()
            value = re.sub(r"\\(.)", r"\1", value)
            value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m[1] or m[2]], value)
            matchers.append((label, op, value))
            position = match.end()
        found.append(Selector(name, matchers))
    return found


def test_selector_extractor() -> None:
    expr = (
        '(sum(rate(gateway_requests_total{route=~"$route", code=~"5.."}[$__rate_interval])) or vector(0)) / '
        "histogram_quantile(0.95, sum by (le) (rate(gateway_request_duration_seconds_bucket"
        '{route=~"${route}", route!="unmatched"}[5m]))) - max by (instance, hash) (gateway_config_info == 1)'
        ' + sum(x_total{a!~"b|c", d="e\\"f"})'
    )
    found = [repr(s) for s in selectors_in_expr(expr, {"route": ".*"})]
    assert found == [
        'gateway_requests_total{route=~".*", code=~"5.."}',
        'gateway_request_duration_seconds_bucket{route=~".*", route!="unmatched"}',
        "gateway_config_info{}",
        'x_total{a!~"b|c", d="e"f"}',
    ]
    [five] = selectors_in_expr('x{code=~"5..", kind!="ejected"}', {})
    assert five.matches({"code": "502", "kind": "reset"})
    assert not five.matches({"code": "429", "kind": "reset"})
    assert not five.matches({"code": "503", "kind": "ejected"})
    assert five.matches({"code": "500"}), "a missing label matches != as the empty string"
    [anchored] = selectors_in_expr('x{code=~"5"}', {})
    assert not anchored.matches({"code": "503"}), "PromQL regexes match the whole value"


ZERO_ROUTES = [
    {
        "name": "zero-api",
        "prefix": "/api",
        "auth": "required",
        "require": {"credential_types": ["agent"]},
        "rate_limit": ["zero-ip", "zero-customer", "zero-shadow"],
    },
    {"name": "zero-public", "prefix": "/public", "methods": ["GET"], "auth": "optional"},
    {"name": "zero-pooled", "prefix": "/pooled", "auth": "none", "pool": "zero-pool"},
    {"name": "zero-ws", "path": "/ws", "auth": "none", "websocket": True},
    {"name": "zero-open", "prefix": "/", "auth": "none"},
]
ZERO_POLICIES = {
    "zero-ip": {"key": ["ip"], "rate": 10, "burst": 20, "scope": "local"},
    "zero-customer": {"key": ["customer"], "rate": 10, "burst": 20, "scope": "shared"},
    "zero-shadow": {"key": ["customer"], "rate": 1, "burst": 1, "scope": "shared", "shadow": True},
}
ZERO_JWT_SECRET_ENV = "ZERO_TEST_JWT_SECRET"


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers"])
async def test_every_panel_series_exists_at_zero_before_any_traffic(
    workers: int,
    dashboard: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstream: UpstreamServer,
    redis_url: str,
    spawn: Spawn,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    monkeypatch.setenv(ZERO_JWT_SECRET_ENV, "zero-test-secret-of-at-least-32-bytes")
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    config = write_config(
        tmp_path,
        routes=ZERO_ROUTES,
        redis={"url": redis_url},
        rate_limit={"policies": ZERO_POLICIES},
        upstream_pools={"zero-pool": {"targets": [{"url": upstream.url}]}},
        auth={"jwt": {"keys": [{"algorithms": ["HS256"], "secret_env": ZERO_JWT_SECRET_ENV}]}},
        metrics={"multiprocess_dir": str(tmp_path / "metrics")},
    )
    gw = await spawn(config, upstream.url, *(["--workers", str(workers)] if workers > 1 else []))
    await gw.wait_healthy(session)
    # Logged once a process has applied its config, its zeros included (each worker writes its own file).
    await gw.wait_event("gateway_started", count=workers)
    status, body, _ = await fetch(session, f"{gw.admin_url}/metrics")
    scrape = Scrape(body.decode(), status)
    scrape.require_ok()
    assert scrape.total("gateway_requests_total") == 0, "the scrape must come before any request"

    variables = all_values(dashboard)
    problems = []
    for expr in dashboard_exprs(dashboard):
        for selector in selectors_in_expr(expr, variables):
            if base_metric_name(selector.name) in ZERO_EXEMPT:
                continue
            values = [v for labels, v in scrape.values.get(selector.name, []) if selector.matches(labels)]
            if not values:
                problems.append(f"{selector}: no series (in {expr})")
            elif any(v != 0 for v in values):
                problems.append(f"{selector}: {values} before any traffic (in {expr})")
    assert not problems, "panels without a series at 0 before traffic:\n" + "\n".join(problems)
