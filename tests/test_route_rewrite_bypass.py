"""check-config's warning for a route whose rewritten paths (strip_prefix / rewrite_prefix, or an upstream
URL's own path) reach a more protected route's paths on the same upstream (gateway/route_shadows.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_lifecycle import run_cli

from gateway.config import GatewayConfig
from gateway.route_shadows import route_warnings
from gateway.routing import compile_routes

ADMIN = {"name": "admin", "prefix": "/v1.0/admin"}
LEGACY = {"name": "legacy", "prefix": "/legacy", "rewrite_prefix": "/v1.0", "auth": "none"}
API = {"name": "api", "prefix": "/v1.0"}
POOLS = {"p": {"targets": [{"url": "http://a:1"}]}, "q": {"targets": [{"url": "http://a:1"}]}}


def _warnings(*routes: dict[str, Any], **config: Any) -> list[str]:
    return route_warnings(compile_routes(GatewayConfig.model_validate({"routes": list(routes), **config})))


def _bypasses(*routes: dict[str, Any], **config: Any) -> list[str]:
    return [w for w in _warnings(*routes, **config) if " forwards to " in w]


def test_a_rewrite_onto_a_stricter_routes_paths_is_named() -> None:
    warnings = _warnings(ADMIN, LEGACY, API)
    assert warnings == [
        "routes[1] ('legacy') forwards to /v1.0/... on upstream https://api.voipbin.net:443, so also to "
        "/v1.0/admin/..., which routes[0] ('admin') sends there with more protection: through "
        "routes[1] ('legacy') it is less protected (auth: none instead of required)",
        "routes[1] ('legacy') forwards to /v1.0/... on upstream https://api.voipbin.net:443, so also to "
        "/v1.0/..., which routes[2] ('api') sends there with more protection: through "
        "routes[1] ('legacy') it is less protected (auth: none instead of required)",
    ]


@pytest.mark.parametrize(
    ("admin", "legacy"),
    [
        (ADMIN, {**LEGACY, "rewrite_prefix": "/v2"}),  # other upstream paths
        (ADMIN, {**LEGACY, "rewrite_prefix": "/v1.0/administration"}),  # a segment is no prefix of another
        (ADMIN, {**LEGACY, "auth": "required"}),  # as protected
        (ADMIN, {**LEGACY, "upstream": "http://legacy.internal:8080"}),  # another upstream
        (ADMIN, {"name": "legacy", "prefix": "/legacy", "auth": "none"}),  # no rewrite: /legacy/... upstream
        ({**ADMIN, "methods": ["POST"]}, {**LEGACY, "methods": ["GET"]}),  # no method in common
    ],
    ids=["other-paths", "longer-segment", "as-protected", "other-upstream", "no-rewrite", "other-methods"],
)
def test_no_warning_where_the_rewrite_cannot_reach_a_stricter_route(
    admin: dict[str, Any], legacy: dict[str, Any]
) -> None:
    assert _warnings(admin, legacy) == []


def test_a_strip_reaches_every_path_of_its_upstream() -> None:
    [warning] = _bypasses({"name": "raw", "prefix": "/raw", "strip_prefix": True, "auth": "optional"}, ADMIN)
    assert warning.startswith("routes[0] ('raw') forwards to /... on upstream https://api.voipbin.net:443")
    assert "/v1.0/admin/..., which routes[1] ('admin')" in warning
    assert warning.endswith("(auth: optional instead of required)")


def test_a_stricter_rewritten_route_is_reached_through_a_plain_one() -> None:
    """The rewrite can be the protected route's: its upstream paths are the open route's own."""
    secure = {"name": "secure", "prefix": "/secure", "rewrite_prefix": "/internal"}
    [warning] = _bypasses(secure, {"name": "open", "path": "/internal/{id}", "auth": "none"})
    assert warning.startswith("routes[1] ('open') forwards to /internal/{id} on upstream")
    assert "so also to /internal/{id}, which routes[0] ('secure') sends there" in warning


def test_weaker_require_and_missing_rate_limits_count_too() -> None:
    admin = {**ADMIN, "require": {"credential_types": ["agent"]}, "rate_limit": ["ip-api"]}
    [warning] = _bypasses(admin, {**LEGACY, "auth": "required"})
    assert warning.endswith("(weaker require; no rate_limit ip-api)")


def test_the_same_pool_is_the_same_upstream() -> None:
    in_p = {**LEGACY, "pool": "p"}
    assert len(_bypasses({**ADMIN, "pool": "p"}, in_p, upstream_pools=POOLS)) == 1
    assert "on upstream pool 'p'" in _bypasses({**ADMIN, "pool": "p"}, in_p, upstream_pools=POOLS)[0]
    assert _bypasses({**ADMIN, "pool": "q"}, in_p, upstream_pools=POOLS) == []
    assert _bypasses(ADMIN, in_p, upstream_pools=POOLS) == []  # the default upstream is no pool


@pytest.mark.parametrize(
    ("admin_upstream", "legacy_upstream", "rewrite_prefix", "reached"),
    [
        ("http://svc", "http://SVC:80", "/v1.0", True),  # one origin, spelt two ways
        ("https://svc", "https://svc:443/", "/v1.0", True),
        ("http://svc", "http://svc:8080", "/v1.0", False),
        ("http://svc", "https://svc", "/v1.0", False),
        ("http://svc/base", "http://svc/base", "/v1.0", True),
        ("http://svc/base", "http://svc", "/v1.0", False),  # /v1.0/... is not /base/v1.0/admin/...
        ("http://svc", "http://svc/v1.0/admin", "/", True),  # the URL's own path puts it there
    ],
)
def test_the_upstream_is_its_origin_and_its_urls_path_goes_first(
    admin_upstream: str, legacy_upstream: str, rewrite_prefix: str, reached: bool
) -> None:
    admin = {**ADMIN, "upstream": admin_upstream}
    legacy = {**LEGACY, "upstream": legacy_upstream, "rewrite_prefix": rewrite_prefix}
    assert bool(_bypasses(admin, legacy)) == reached


def test_ipv6_and_default_ports() -> None:
    found = _bypasses({**ADMIN, "upstream": "http://[::1]"}, {**LEGACY, "upstream": "http://[::1]:80"})
    assert len(found) == 1 and "on upstream http://[::1]:80," in found[0]


def test_a_base_path_alone_moves_a_route_onto_another() -> None:
    """No rewrite key, but the upstream URL's own path: /x/... reaches the upstream as /v1.0/admin/x/..."""
    moved = {
        "name": "moved",
        "prefix": "/x",
        "auth": "none",
        "upstream": "https://api.voipbin.net/v1.0/admin",
    }
    [warning] = _bypasses(ADMIN, moved)
    assert warning.startswith("routes[1] ('moved') forwards to /v1.0/admin/x/... on upstream")


def test_routes_that_keep_their_paths_are_left_to_the_shadow_check() -> None:
    """Same upstream, no rewrite: the route table's order decides, which the shadow warning covers."""
    assert _bypasses(ADMIN, {"name": "open", "prefix": "/v1.0", "auth": "none"}) == []


def test_check_config_prints_the_bypass(tmp_path: Path) -> None:
    config = tmp_path / "rewrite.yaml"
    config.write_text(
        "routes:\n"
        "  - {name: admin, prefix: /v1.0/admin}\n"
        "  - {name: legacy, prefix: /legacy, rewrite_prefix: /v1.0, auth: none}\n",
        encoding="utf-8",
    )
    result = run_cli("check-config", "--config", str(config))
    assert (result.returncode, result.stdout) == (0, "ok\n")
    assert result.stderr.startswith("warning: routes[1] ('legacy') forwards to /v1.0/... on upstream")
    assert "routes[0] ('admin')" in result.stderr
