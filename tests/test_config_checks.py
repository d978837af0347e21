"""Problems across configuration keys are reported all at once, each at its own key path with a short value,
beside the fields' own errors: one mistake never hides another."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import ConfigError, GatewayConfig, RouteConfig, load_config


def problems(tmp_path: Path, text: str) -> list[str]:
    """check-config's lines for a YAML file (without the heading line)."""
    path = tmp_path / "gw.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    heading, *lines = str(info.value).splitlines()
    assert heading == f"invalid configuration ({path}):"
    return [line.strip() for line in lines]


POLICY = "rate_limit:\n  policies:\n    tiny: {key: [ip], rate: 1, burst: 2, scope: local}\n"


def test_a_bad_prefix_hides_neither_an_unknown_policy_nor_a_duplicate_name(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        POLICY + "routes:\n"
        "  - {name: a, prefix: auth, auth: none}\n"
        "  - {name: b, prefix: /b, auth: none, rate_limit: [nope, tiny]}\n"
        "  - {name: b, prefix: /c, auth: none}\n",
    )
    assert found == [
        "routes[0].prefix = 'auth': Value error, must start with '/'",
        "routes[1].rate_limit = ['nope', 'tiny']: unknown policy 'nope'; defined: tiny",
        "routes[2].name = 'b': also the name of routes[1]; names label logs and metrics",
    ]


def test_an_unknown_policy_hides_no_cost_over_a_burst(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        POLICY + "routes:\n"
        "  - {name: a, prefix: /a, auth: none, rate_limit: [missing]}\n"
        "  - {name: b, prefix: /b, auth: none, rate_limit: [tiny], cost: 5}\n",
    )
    assert len(found) == 2
    assert found[0] == "routes[0].rate_limit = ['missing']: unknown policy 'missing'; defined: tiny"
    assert found[1].startswith("routes[1].cost = 5: more than policy 'tiny' ever admits at once")
    assert "rate_limit.policies.tiny.burst = 2" in found[1]


def test_default_routes_naming_policies_the_file_no_longer_defines(tmp_path: Path) -> None:
    found = problems(tmp_path, POLICY)
    assert found[0] == (
        "routes[0].rate_limit = ['ip-account', 'customer']: unknown policies 'ip-account', 'customer'; "
        "defined: tiny"
    )
    assert [line.split(" = ")[0] for line in found] == [f"routes[{i}].rate_limit" for i in range(5)]


def test_key_store_problems_are_each_at_their_own_key(tmp_path: Path) -> None:
    found = problems(tmp_path, "auth:\n  access_keys:\n    stores: [introspect, redis, file]\n")
    assert found == [
        "auth.access_keys.stores = ['introspect', 'redis', 'file']: "
        "'introspect' must come last: it answers for the rest",
        "auth.access_keys.stores = ['introspect', 'redis', 'file']: "
        "includes 'redis' but redis.url is not set",
        "auth.access_keys.file = None: must be set when stores includes 'file'",
        "auth.access_keys.pepper_env = None: keys stored by the gateway (stores redis or file) need "
        "pepper_env or pepper_file",
    ]


def test_empty_key_store_settings_are_unset(tmp_path: Path) -> None:
    found = problems(tmp_path, "auth:\n  access_keys: {stores: [file], file: '', pepper_env: ''}\n")
    assert [line.split(" = ")[0] for line in found] == [
        "auth.access_keys.file",
        "auth.access_keys.pepper_env",
    ]


def test_a_route_that_needs_a_credential_nothing_can_verify(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "auth:\n  access_keys: {stores: []}\n"
        "routes:\n  - {name: open, prefix: /o, auth: none}\n  - {name: locked, prefix: /}\n",
    )
    assert found == [
        "routes[1].auth = 'required': nothing can verify a credential: set auth.jwt.keys or "
        "auth.access_keys.stores, or auth: none"
    ]


def test_field_errors_and_cross_key_problems_come_together(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "upstream: {retries: 9}\n"
        + POLICY
        + "routes:\n  - {name: a, prefix: /a, auth: none, rate_limit: [gone]}\n  - {name: a, prefix: /b}\n",
    )
    assert [line.split(" = ")[0] for line in found] == [
        "upstream.retries",
        "routes[0].rate_limit",
        "routes[1].name",
    ]


def test_parts_given_as_models_are_checked_too() -> None:
    with pytest.raises(ValidationError) as info:
        GatewayConfig(
            routes=(
                RouteConfig(name="a", prefix="/a", auth="none", rate_limit=("nope",)),
                RouteConfig(name="a", prefix="/b", auth="none"),
            )
        )
    assert [error["loc"] for error in info.value.errors()] == [
        ("routes", 0, "rate_limit"),
        ("routes", 1, "name"),
    ]


def test_another_bad_key_store_setting_hides_no_store_problem(tmp_path: Path) -> None:
    found = problems(tmp_path, "auth:\n  access_keys: {stores: [introspect, file], cache_ttl: -5}\n")
    assert [line.split(" = ")[0] for line in found] == [
        "auth.access_keys.cache_ttl",
        "auth.access_keys.stores",
        "auth.access_keys.file",
        "auth.access_keys.pepper_env",
    ]


def test_an_invalid_part_only_skips_the_checks_that_need_it(tmp_path: Path) -> None:
    """A policies section that is not a mapping cannot say which names exist: no guesses about them."""
    found = problems(
        tmp_path,
        "rate_limit: {policies: 5}\n"
        "routes:\n  - {name: a, prefix: /a, rate_limit: [x]}\n  - {name: a, prefix: /b}\n",
    )
    assert [line.split(" = ")[0] for line in found] == ["rate_limit.policies", "routes[1].name"]


def test_tracing_settings_are_checked_at_their_keys(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "tracing:\n  enabled: true\n  propagate: false\n  sample_ratio: 1.5\n"
        "  endpoint: http://user:pw@collector:4318/v1/traces\n  max_queue_size: 0\n",
    )
    assert [line.split(" = ")[0] for line in found] == [
        "tracing.sample_ratio",
        "tracing.endpoint",
        "tracing.max_queue_size",
        "tracing.propagate",
    ]
    assert "less than or equal to 1" in found[0]
    assert "pw" not in found[1] and "must not carry credentials" in found[1]
    assert found[3] == (
        "tracing.propagate = False: must be true while tracing.enabled is true: the upstream would not be "
        "told about the gateway's spans, which would be orphans in the trace; set propagate: true, or "
        "enabled: false"
    )


def test_a_collector_header_value_is_never_shown(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "tracing:\n  headers: {'bad name': s3cr3t-1, x-num: 12345, x-crlf: \"a\\r\\nb-s3cr3t-2\", "
        "x-list: [s3cr3t-3]}\n",
    )
    assert all("s3cr3t" not in line for line in found)
    assert [line.split(" = ")[0].split(":")[0] for line in found] == [
        "tracing.headers.bad name.[key]",
        "tracing.headers.x-crlf",
        "tracing.headers.x-list",
    ]
    assert found[1] == "tracing.headers.x-crlf: Value error, must not contain CR, LF or NUL"


@pytest.mark.parametrize("headers", ["'x-api-key: s3cr3t-4'", "[s3cr3t-5]", "[{x-api-key: s3cr3t-6}]"])
def test_collector_headers_that_are_no_mapping_are_not_shown(tmp_path: Path, headers: str) -> None:
    found = problems(tmp_path, f"tracing:\n  headers: {headers}\n")
    assert len(found) == 1 and "s3cr3t" not in found[0]
    assert found[0].startswith("tracing.headers: must be a mapping of header names to values")


def test_a_numeric_collector_key_is_a_string() -> None:
    config = GatewayConfig.model_validate({"tracing": {"headers": {"x-api-key": 12345}}})
    assert config.tracing.headers["x-api-key"].get_secret_value() == "12345"
    assert "12345" not in repr(config) and "12345" not in config.model_dump_json()
