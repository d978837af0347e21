"""gateway/config.py and the shipped config/gateway.yaml: defaults, env, precedence, error messages."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from gateway.config import (
    HTTP_METHODS,
    ConfigError,
    GatewayConfig,
    RouteConfig,
    load_config,
    parse_listen,
)

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _config_error(**kwargs: Any) -> str:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return str(info.value)


def _write(tmp_path: Path, text: str | bytes, name: str = "gw.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- the shipped file ---------------------------------------------------------------------------------------


def test_shipped_yaml_equals_builtin_defaults() -> None:
    shipped = load_config(SHIPPED, environ={})
    assert shipped == load_config(None, environ={})
    assert shipped == GatewayConfig()
    # The comparison above is not vacuous: a changed value makes the configs differ.
    assert shipped != load_config(None, environ={}, overrides={"server.workers": 2})


def _compare_sections(model: type[BaseModel], data: dict[str, Any], where: str) -> list[str]:
    problems = []
    model_keys = set(model.model_fields)
    yaml_keys = set(data)
    if model_keys != yaml_keys:
        missing, unknown = sorted(model_keys - yaml_keys), sorted(yaml_keys - model_keys)
        problems.append(f"{where}: missing from YAML {missing}, unknown {unknown}")
    for name, info in model.model_fields.items():
        nested = _nested_model(info.annotation)
        if nested is None or typing.get_origin(info.annotation) in (tuple, dict) or name not in data:
            continue  # lists and maps of models (routes, jwt keys, policies) are examples, not every key
        if not isinstance(data[name], dict):
            problems.append(f"{where}.{name}: not a mapping in the YAML")
            continue
        problems += _compare_sections(nested, data[name], f"{where}.{name}")
    return problems


def test_shipped_yaml_lists_every_key_of_the_model() -> None:
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert _compare_sections(GatewayConfig, data, "(top)") == []


def _leaf_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        nested = _nested_model(info.annotation)
        if nested is not None:
            names |= _leaf_names(nested)
    return names


def test_shipped_yaml_routes_are_a_list_and_document_every_route_key() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    routes = yaml.safe_load(text)["routes"]
    assert isinstance(routes, list)
    assert [r["name"] for r in routes] == [r.name for r in GatewayConfig().routes]
    allowed = set(RouteConfig.model_fields)
    for route in routes:
        assert set(route) <= allowed, route
    # Route keys that no shipped route uses are at least named in the file (in the comment above `routes:`).
    words = set(re.findall(r"[a-z_]+", text))
    assert _leaf_names(RouteConfig) - words == set()


def test_nested_model_walk_sees_every_section() -> None:
    # Guards the helper the two tests above rely on: a walk that found no sections would pass trivially.
    sections = {n for n, i in GatewayConfig.model_fields.items() if _nested_model(i.annotation)}
    assert sections == {
        "tls",
        "admin_tls",
        "server",
        "upstream",
        "upstream_pools",
        "limits",
        "errors",
        "health",
        "redis",
        "rate_limit",
        "cors",
        "websocket",
        "metrics",
        "auth",
        "tracing",
        "logging",
        "routes",
    }
    assert {"connect", "response_headers", "idle_read", "max_connections"} <= _leaf_names(GatewayConfig)


# --- environment and precedence -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "get", "expected"),
    [
        (
            "GATEWAY_UPSTREAM_URL",
            "http://up.internal:8000/",
            lambda c: c.upstream.url,
            "http://up.internal:8000",
        ),
        ("GATEWAY_LISTEN", "0.0.0.0:80", lambda c: c.listen, "0.0.0.0:80"),
        ("GATEWAY_ADMIN_LISTEN", "[::1]:9000", lambda c: c.admin_listen, "[::1]:9000"),
        ("GATEWAY_REDIS_URL", "redis://redis:6379/0", lambda c: c.redis.url, "redis://redis:6379/0"),
        (
            "GATEWAY_UPSTREAM_TIMEOUTS_RESPONSE_HEADERS",
            "7.5",
            lambda c: c.upstream.timeouts.response_headers,
            7.5,
        ),
        (
            "GATEWAY_UPSTREAM_POOL_MAX_CONNECTIONS_PER_HOST",
            "3",
            lambda c: c.upstream.pool.max_connections_per_host,
            3,
        ),
        ("GATEWAY_UPSTREAM_POOL_MAX_WEBSOCKETS", "50", lambda c: c.upstream.pool.max_websockets, 50),
        (
            "GATEWAY_UPSTREAM_TIMEOUTS_REQUEST_BODY_IDLE",
            "5",
            lambda c: c.upstream.timeouts.request_body_idle,
            5.0,
        ),
        ("GATEWAY_UPSTREAM_TLS_VERIFY", "false", lambda c: c.upstream.tls_verify, False),
        ("GATEWAY_SERVER_WORKERS", "4", lambda c: c.server.workers, 4),
        (
            "GATEWAY_SERVER_TRUSTED_PROXIES",
            '["10.0.0.0/8", "::1/128"]',
            lambda c: c.server.trusted_proxies,
            ("10.0.0.0/8", "::1/128"),
        ),
        ("GATEWAY_ERRORS_FORMAT", "flat", lambda c: c.errors.format, "flat"),
        ("GATEWAY_LIMITS_MAX_BODY_BYTES", "1MiB", lambda c: int(c.limits.max_body_bytes), 1024 * 1024),
        (
            "GATEWAY_ROUTES",
            '[{"name": "all", "prefix": "/"}]',
            lambda c: [(r.name, r.prefix) for r in c.routes],
            [("all", "/")],
        ),
    ],
)
def test_env_override(name: str, value: str, get: Any, expected: Any) -> None:
    default = get(load_config(None, environ={}))
    assert default != expected  # the override is observable
    assert get(load_config(None, environ={name: value})) == expected


def test_env_override_leaves_sibling_keys_alone() -> None:
    config = load_config(None, environ={"GATEWAY_UPSTREAM_TIMEOUTS_RESPONSE_HEADERS": "7"})
    assert config.upstream.timeouts.connect == 5.0
    assert config.upstream.timeouts.idle_read == 60.0
    assert config.upstream.url == "https://api.voipbin.net"


def test_env_scalars_stay_strings_for_pydantic() -> None:
    # "0123" must not be turned into a number on its way to a string field (it fails URL validation as text).
    message = _config_error(environ={"GATEWAY_UPSTREAM_URL": "0123"})
    assert "upstream.url = '0123'" in message


def test_env_variables_without_prefix_are_ignored() -> None:
    assert load_config(None, environ={"UPSTREAM_URL": "ftp://x", "PATH": "/bin"}) == GatewayConfig()


@pytest.mark.parametrize("name", ["GATEWAY_FOO", "GATEWAY_UPSTREAM_TIMEOUTS_BOGUS", "GATEWAY_SERVER_WORKER"])
def test_unknown_env_variable_is_an_error_naming_it(name: str) -> None:
    message = _config_error(environ={name: "1"})
    assert name in message
    assert "no such configuration key" in message


def test_gateway_config_env_picks_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "server:\n  workers: 3\n")
    assert load_config(None, environ={"GATEWAY_CONFIG": str(path)}).server.workers == 3
    # An explicit path beats GATEWAY_CONFIG.
    other = _write(tmp_path, "server:\n  workers: 5\n", "other.yaml")
    assert load_config(other, environ={"GATEWAY_CONFIG": str(path)}).server.workers == 5


def test_gateway_config_env_is_not_a_config_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    assert load_config(None, environ={"GATEWAY_CONFIG": str(path)}) == GatewayConfig()


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nserver:\n  workers: 2\n")
    environ = {"GATEWAY_ADMIN_LISTEN": "127.0.0.1:20", "GATEWAY_SERVER_WORKERS": "3"}
    config = load_config(path, environ=environ, overrides={"server.workers": 4, "listen": None})
    assert config.listen == "127.0.0.1:1"  # file only (a None override is "not given")
    assert config.admin_listen == "127.0.0.1:20"  # env beats file
    assert config.server.workers == 4  # overrides beat env
    # Env merges into the file's section instead of replacing it.
    path2 = _write(tmp_path, "server:\n  workers: 2\n  drain_timeout: 9\n", "b.yaml")
    merged = load_config(path2, environ={"GATEWAY_SERVER_WORKERS": "6"})
    assert (merged.server.workers, merged.server.drain_timeout) == (6, 9.0)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "# nothing\n"), environ={}) == GatewayConfig()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    "value", ["8080", "127.0.0.1", "::1:8080", "host:65536", "host:-1", ":8080", "[::1]8080", "h:8080x"]
)
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|between 0 and 65535"):
        parse_listen(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10MiB", 10 * 1024 * 1024), ("16KiB", 16 * 1024), ("1KB", 1000), ("2048", 2048), (4096, 4096)],
)
def test_byte_sizes_accepted(value: Any, expected: int) -> None:
    config = load_config(None, environ={}, overrides={"limits.max_body_bytes": value})
    assert int(config.limits.max_body_bytes) == expected


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("https://api.voipbin.net/", "https://api.voipbin.net"),
        ("http://10.0.0.1:8000/base/", "http://10.0.0.1:8000/base"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_upstream_url_accepted_and_trailing_slash_dropped(url: str, stored: str) -> None:
    assert load_config(None, environ={}, overrides={"upstream.url": url}).upstream.url == stored


def test_methods_are_uppercased() -> None:
    routes = [{"name": "a", "prefix": "/", "methods": ["get", "Post"]}]
    config = load_config(None, environ={}, overrides={"routes": routes})
    assert config.routes[0].methods == ("GET", "POST")


# --- error messages -----------------------------------------------------------------------------------------

ROUTE_OK = {"name": "ok", "prefix": "/"}


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"listen": "8080"}, ["listen = '8080'", "HOST:PORT"]),
        ({"admin_listen": "h:99999"}, ["admin_listen = 'h:99999'", "65535"]),
        ({"upstream.url": "ftp://x"}, ["upstream.url = 'ftp://x'", "http://", "https://"]),
        ({"upstream.url": "https://x/?q=1"}, ["upstream.url", "without query"]),
        ({"upstream.url": "http://svc:99999"}, ["upstream.url = 'http://svc:99999'", "from 1 to 65535"]),
        ({"upstream.url": "http://svc:abc"}, ["upstream.url", "port that is not a number"]),
        (
            {"upstream.url": "http://svc:hunter2@api.local"},
            ["upstream.url = 'http://[redacted]@api.local'", "must not carry credentials"],
        ),
        ({"upstream.timeouts.connect": -1}, ["upstream.timeouts.connect = -1", "greater than 0"]),
        ({"upstream.timeouts.idle_read": 0}, ["upstream.timeouts.idle_read = 0", "greater than 0"]),
        ({"upstream.retries": 4}, ["upstream.retries = 4", "less than or equal to 3"]),
        (
            {"upstream.foo": 1},
            [
                "upstream.foo = 1",
                "unknown key",
                "max_error_body_bytes, pool, pool_name, preserve_host, request_buffer_bytes, retries, "
                "timeouts, tls, tls_verify, url",
            ],
        ),
        ({"colour": "red"}, ["colour = 'red'", "unknown key", "admin_listen", "routes", "upstream"]),
        (
            {"upstream.timeouts.total": 3},
            ["upstream.timeouts.total", "connect, idle_read, request_body_idle, response_headers"],
        ),
        (
            {"upstream.timeouts.request_body_idle": 0},
            ["upstream.timeouts.request_body_idle = 0", "greater than 0"],
        ),
        ({"upstream.pool.max_websockets": 0}, ["upstream.pool.max_websockets = 0", "greater than 0"]),
        ({"errors.format": "xml"}, ["errors.format = 'xml'", "'canonical'", "'flat'"]),
        ({"logging.level": "loud"}, ["logging.level = 'loud'", "'debug'", "'error'"]),
        ({"redis.url": "http://r"}, ["redis.url = 'http://r'", "redis://"]),
        (
            {"server.trusted_proxies": ["10.0.0.0/8", "10.0.0.0/33"]},
            ["server.trusted_proxies", "'10.0.0.0/33'", "10.0.0.0/8 or ::1/128"],
        ),
        ({"server.trusted_proxies": ["not-a-net"]}, ["'not-a-net'", "is not an IP network"]),
        (
            {"server.server_header": "gw\r\nX-Evil: 1"},
            ["server.server_header = 'gw\\r\\nX-Evil: 1'", "printable"],
        ),
        ({"server.server_header": ""}, ["server.server_header = ''", "1-64 printable ASCII"]),
        (
            {"routes": [ROUTE_OK, {"name": "b", "prefix": "/x", "methods": ["get", "FETCH"]}]},
            ["routes[1].methods", "'FETCH' is not an HTTP method", ", ".join(HTTP_METHODS)],
        ),
        (
            {"routes": [ROUTE_OK, {"name": "b", "prefix": "/x", "path": "/y"}]},
            ["routes[1]", "exactly one of 'prefix' or 'path'"],
        ),
        ({"routes": [ROUTE_OK, {"name": "b"}]}, ["routes[1]", "exactly one of 'prefix' or 'path'"]),
        ({"routes": [{"name": "b", "prefix": "api"}]}, ["routes[0].prefix = 'api'", "must start with '/'"]),
        ({"routes": [ROUTE_OK, ROUTE_OK]}, ["routes[1].name = 'ok'", "also the name of routes[0]"]),
        ({"routes": [{"name": "Bad Name", "prefix": "/"}]}, ["routes[0].name = 'Bad Name'", "pattern"]),
        (
            {"routes": [ROUTE_OK, {"name": "b", "prefix": "/", "timeouts": {"read": 1}}]},
            [
                "routes[1].timeouts.read = 1",
                "unknown key",
                "connect, idle_read, request_body_idle, response_headers",
            ],
        ),
        (
            {"routes": [ROUTE_OK, {"name": "b", "prefix": "/", "retries": 2}]},
            ["routes[1].retries = 2", "unknown key", "max_body_bytes", "websocket"],
        ),
        ({"routes": [{"name": "b", "prefix": "/", "upstream": "ws://x"}]}, ["routes[0].upstream = 'ws://x'"]),
        (
            {"auth.introspect.answer_claim": "agent.id"},
            ["auth.introspect.answer_claim = 'agent.id'", "one claim name, without dots"],
        ),
        ({"auth.max_credential_bytes": "big"}, ["auth.max_credential_bytes = 'big'", "16KiB"]),
    ],
)
def test_error_message_names_key_value_and_what_is_allowed(
    overrides: dict[str, Any], fragments: list[str]
) -> None:
    message = _config_error(overrides=overrides)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "hunter2" not in message


def test_error_message_names_where_an_overriding_value_came_from(tmp_path: Path) -> None:
    path = _write(tmp_path, "server:\n  workers: 0\n")
    environ = {"GATEWAY_LISTEN": "nonsense", "GATEWAY_SERVER_TRUSTED_PROXIES": '["10.0.0.0/33"]'}
    message = _config_error(path=path, environ=environ, overrides={"admin_listen": "x"})
    assert "listen = 'nonsense' (from GATEWAY_LISTEN): " in message
    assert "server.trusted_proxies = ['10.0.0.0/33'] (from GATEWAY_SERVER_TRUSTED_PROXIES): " in message
    assert "admin_listen = 'x' (from the command line): " in message
    assert "server.workers = 0: " in message  # from the file, which the first line names
    assert message.startswith(f"invalid configuration ({path}):")


def test_error_message_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "upstream:\n  timeouts:\n    connect: -2\n")
    message = _config_error(path=path)
    assert str(path) in message
    assert "upstream.timeouts.connect = -2" in message


def test_error_message_lists_every_bad_key() -> None:
    message = _config_error(overrides={"listen": "x", "server.workers": 0})
    assert "listen = 'x'" in message
    assert "server.workers = 0" in message


def test_error_message_shortens_huge_values() -> None:
    message = _config_error(overrides={"listen": "x" * 1000})
    assert "x" * 1000 not in message
    assert "listen = 'xxx" in message


def test_byte_size_in_words_is_rejected_naming_key_and_value() -> None:
    message = _config_error(overrides={"limits.max_body_bytes": "ten"})
    assert "limits.max_body_bytes = 'ten'" in message


def test_byte_size_error_says_what_is_allowed() -> None:
    # ConfigError's contract: the message names what is allowed. For a byte size that means the form
    # (a number with an optional unit such as KiB/MiB). pydantic's own text says only that it could not parse.
    message = _config_error(overrides={"limits.max_body_bytes": "ten"})
    assert re.search(r"KiB|MiB|\bunit[s]?\b.*(B|KB|MB)", message), message


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("a: [\n", ["not valid YAML", "line"]),
        ("listen: '127.0.0.1:8080\n", ["not valid YAML"]),
        ("- listen\n- server\n", ["top level must be a mapping", "list"]),
        ("just a string\n", ["top level must be a mapping", "str"]),
    ],
)
def test_bad_yaml_files(tmp_path: Path, content: str, fragments: list[str]) -> None:
    path = _write(tmp_path, content)
    message = _config_error(path=path)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = _config_error(path=path)
    assert str(path) in message
    assert "cannot be read" in message
    assert "No such file" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    message = _config_error(path=tmp_path)
    assert "cannot be read" in message


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    # A Latin-1 file (a comment with "é") makes read_text raise UnicodeDecodeError, which is not an OSError.
    path = _write(tmp_path, "# caf\xe9\nlisten: 127.0.0.1:1\n".encode("latin-1"))
    message = _config_error(path=path)
    assert str(path) in message


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("upstream.timeouts.connect", {"upstream": {"timeouts": {"connect": float("inf")}}}),
        ("auth.jwt.leeway", {"auth": {"jwt": {"leeway": float("inf")}}}),
        ("rate_limit.redis_budget", {"rate_limit": {"redis_budget": float("nan")}}),
    ],
)
def test_infinities_and_nan_are_refused(key, raw):
    with pytest.raises(ValidationError) as info:
        GatewayConfig.model_validate(raw)
    assert key.split(".")[-1] in str(info.value)


def test_kubernetes_service_link_variables_are_not_settings():
    environ = {
        "GATEWAY_PORT": "tcp://10.0.0.1:8080",
        "GATEWAY_SERVICE_HOST": "10.0.0.1",
        "GATEWAY_SERVICE_PORT": "8080",
        "GATEWAY_PORT_8080_TCP_ADDR": "10.0.0.1",
    }
    assert load_config(None, environ=environ) == load_config(None, environ={})
    with pytest.raises(ConfigError, match="GATEWAY_PORTS"):
        load_config(None, environ={"GATEWAY_PORTS": "1"})


def _route_costing(cost: int, **policy: Any) -> dict[str, Any]:
    return {
        "rate_limit": {"policies": {"expensive": {"key": ["route", "customer"], **policy}}},
        "routes": [
            {"name": "other", "prefix": "/other", "auth": "none"},
            {"name": "recordings", "prefix": "/r", "auth": "none", "rate_limit": ["expensive"], "cost": cost},
        ],
    }


@pytest.mark.parametrize(
    ("policy", "source"),
    [
        ({"rate": 1, "burst": 2}, "rate_limit.policies.expensive.burst = 2"),
        (
            {"rate": 1, "burst": 9, "by_credential_type": {"direct": {"burst": 2}}},
            "rate_limit.policies.expensive.by_credential_type.direct.burst = 2",
        ),
        (
            {"rate": 1, "burst": 9, "plans": {"free": {"burst": 4}}},
            "rate_limit.policies.expensive.plans.free.burst = 4",
        ),
        ({"algorithm": "quota", "window": "day", "limit": 3}, "rate_limit.policies.expensive.limit = 3"),
        (
            {"algorithm": "quota", "window": "day", "limit": 900, "plans": {"free": {"limit": 1}}},
            "rate_limit.policies.expensive.plans.free.limit = 1",
        ),
    ],
)
def test_a_route_cost_above_a_policys_limit_is_refused(policy: dict[str, Any], source: str) -> None:
    """Such a request would get a 429 whose Retry-After can never be honoured."""
    with pytest.raises(ValidationError) as info:
        GatewayConfig.model_validate(_route_costing(5, **policy))
    [error] = info.value.errors()
    assert (error["loc"], error["input"]) == (("routes", 1, "cost"), 5)
    assert source in error["msg"] and "policy 'expensive'" in error["msg"] and "at most" in error["msg"]


@pytest.mark.parametrize(
    "policy",
    [
        {"rate": 1, "burst": 5, "plans": {"pro": {"burst": 50}}},
        {"algorithm": "quota", "window": "month", "limit": 5},
        {"algorithm": "quota", "window": "month", "limit": 100, "plans": {"blocked": {"limit": 0}}},
    ],
)
def test_a_cost_every_variant_can_admit_is_accepted(policy: dict[str, Any]) -> None:
    """A cost equal to the limit passes; a limit of 0 blocks on purpose and is not a mistake."""
    assert GatewayConfig.model_validate(_route_costing(5, **policy)).routes[1].cost == 5
