"""Configuration problems that span keys: a route naming an undefined policy, a cost no policy ever admits,
two routes with one name, a key store without its settings, a TLS certificate without its key.

Every problem is reported at its own key path with a short value, beside the fields' own errors. The checks
read the raw configuration, validating each part they need on its own: an invalid part is reported by its own
validation and only the checks that need it are skipped, so one mistake never hides another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from gateway.config import (
    AccessKeysConfig,
    PolicyConfig,
    PolicyValues,
    RedisConfig,
    RouteConfig,
    TlsConfig,
    TracingConfig,
    UpstreamConfig,
    UpstreamTls,
    default_routes,
    documented_tiers,
)

_INVALID = object()


def cross_field_problems(raw: Mapping[str, Any]) -> list[InitErrorDetails]:
    """The cross-key problems of a raw configuration (a mapping as the YAML file gives it)."""
    problems: list[InitErrorDetails] = []
    policies = _policies(raw)
    problems += _key_store_problems(raw)
    problems += _tls_problems(raw)
    problems += _tracing_problems(raw)
    pools = _pool_names(raw)
    problems += _default_pool_problems(raw, pools)
    routes = raw.get("routes", _INVALID)
    if "routes" not in raw:
        routes = [route.model_dump() for route in default_routes()]
    if not isinstance(routes, list | tuple):
        return problems
    can_verify = _can_verify(raw)
    seen: dict[str, int] = {}
    for index, route in enumerate(routes):
        if not isinstance(route, Mapping):
            continue

        def problem(key: str, value: Any, message: str, index: int = index) -> None:
            problems.append(_problem(("routes", index, key), value, message))

        name = _field(RouteConfig, "name", route)
        if name is not _INVALID:
            if name in seen:
                problem("name", name, f"also the name of routes[{seen[name]}]; names label logs and metrics")
            seen.setdefault(name, index)
        names = _field(RouteConfig, "rate_limit", route)
        if names is not _INVALID and policies is not None:
            unknown = [n for n in names if n not in policies]
            if unknown:
                known = ", ".join(sorted(policies)) or "none defined"
                listed = ("policy " if len(unknown) == 1 else "policies ") + ", ".join(map(repr, unknown))
                problem("rate_limit", list(names), f"unknown {listed}; defined: {known}")
            cost = _field(RouteConfig, "cost", route)
            for policy_name in names if cost is not _INVALID else ():
                policy = policies.get(policy_name)
                if policy is not None and (why := _cost_above_limit(cost, policy_name, policy)):
                    problem("cost", cost, why)
        auth = _field(RouteConfig, "auth", route)
        if auth not in (_INVALID, "none") and can_verify is False:
            problem(
                "auth",
                auth,
                "nothing can verify a credential: set auth.jwt.keys or auth.access_keys.stores, "
                "or auth: none",
            )
        pool = _field(RouteConfig, "pool", route)
        if pool not in (None, _INVALID):
            if route.get("upstream") is not None:
                problem("pool", pool, "a route takes its targets from 'pool' or 'upstream', not both")
            elif pools is not None and pool not in pools:
                problem("pool", pool, _unknown_pool(pool, pools))
        message_bytes = _field(RouteConfig, "max_message_bytes", route)
        if message_bytes not in (None, _INVALID) and _field(RouteConfig, "websocket", route) is False:
            problem(
                "max_message_bytes",
                message_bytes,
                "only for a WebSocket route (HTTP bodies have max_body_bytes); allowed: unset here, or "
                "websocket: true",
            )
        for key, value in _prefix_rewrites_on_a_path_route(route):
            problem(
                key,
                value,
                "only for a route with a prefix: a path route has no prefix to replace; "
                "allowed: unset here, or prefix instead of path",
            )
    return problems


def _prefix_rewrites_on_a_path_route(route: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """strip_prefix or rewrite_prefix set on a `path:` route (one with both matchers has its own error)."""
    if route.get("prefix") is not None or _field(RouteConfig, "path", route) in (None, _INVALID):
        return []
    found = [(key, _field(RouteConfig, key, route)) for key in ("strip_prefix", "rewrite_prefix")]
    return [(key, value) for key, value in found if value not in (None, False, _INVALID)]


def _pool_names(raw: Mapping[str, Any]) -> list[str] | None:
    """The names in upstream_pools (whether or not each pool is valid); None when it is not a mapping."""
    found = raw.get("upstream_pools", {})
    return sorted(map(str, found)) if isinstance(found, Mapping) else None


def _unknown_pool(name: str, pools: list[str]) -> str:
    return f"unknown pool {name!r}; defined: {', '.join(pools) or 'none (define it under upstream_pools)'}"


def _default_pool_problems(raw: Mapping[str, Any], pools: list[str] | None) -> list[InitErrorDetails]:
    section = _section(raw, "upstream")
    name = None if section is None else _field(UpstreamConfig, "pool_name", section)
    if name in (None, _INVALID) or pools is None or name in pools:
        return []
    return [_problem(("upstream", "pool_name"), name, _unknown_pool(name, pools))]


def _problem(loc: tuple[str | int, ...], value: Any, message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("cross_field", message), loc=loc, input=value)


def _section(raw: Mapping[str, Any], *path: str) -> Mapping[str, Any] | None:
    """The mapping at `path` ({} where absent), or None when something on the way is not a mapping."""
    node: Any = raw
    for key in path:
        node = node.get(key, {})
        if node is None:
            node = {}  # a section left empty in the YAML means all defaults
        if not isinstance(node, Mapping):
            return None
    return node


def _field(model: type[BaseModel], name: str, section: Mapping[str, Any]) -> Any:
    """One field of `model` from a raw section, validated alone: its default when absent, _INVALID if bad."""
    if name not in section:
        return model.model_fields[name].get_default(call_default_factory=True)
    try:
        return _adapter(model, name)(section[name])
    except ValidationError:
        return _INVALID


@cache
def _adapter(model: type[BaseModel], name: str) -> Callable[[Any], Any]:
    info = model.model_fields[name]
    kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(kind).validate_python


def _policies(raw: Mapping[str, Any]) -> dict[str, PolicyConfig | None] | None:
    """Every policy by name, None for one that is itself invalid; None when the set cannot be known."""
    section = _section(raw, "rate_limit")
    if section is None:
        return None
    if "policies" not in section:
        return dict(documented_tiers())
    found = section["policies"]
    if not isinstance(found, Mapping):
        return None
    out: dict[str, PolicyConfig | None] = {}
    for name, value in found.items():
        try:
            out[str(name)] = PolicyConfig.model_validate(value)
        except ValidationError:
            out[str(name)] = None
    return out


def _tracing_problems(raw: Mapping[str, Any]) -> list[InitErrorDetails]:
    section = _section(raw, "tracing")
    if section is None:
        return []
    enabled = _field(TracingConfig, "enabled", section)
    propagate = _field(TracingConfig, "propagate", section)
    if enabled is True and propagate is False:
        message = (
            "must be true while tracing.enabled is true: the upstream would not be told about the gateway's "
            "spans, which would be orphans in the trace; set propagate: true, or enabled: false"
        )
        return [_problem(("tracing", "propagate"), propagate, message)]
    return []


def _tls_problems(raw: Mapping[str, Any]) -> list[InitErrorDetails]:
    """A certificate without its key or the reverse; a listener's client-certificate settings that cannot
    apply; an upstream CA bundle that verifies nothing."""
    problems: list[InitErrorDetails] = []
    sections: list[tuple[tuple[str, ...], type[BaseModel]]] = [
        (("tls",), TlsConfig),
        (("admin_tls",), TlsConfig),
        (("upstream", "tls"), UpstreamTls),
    ]
    for where, model in sections:
        section = _section(raw, *where)
        if section is None:
            continue
        values = {name: _field(model, name, section) for name in model.model_fields}
        if _INVALID in values.values():
            continue  # an invalid value is reported by its own validation; a rule reading it would guess
        found = _key_pair_problems(values)
        found += _client_cert_problems(values) if model is TlsConfig else _upstream_ca_problems(values, raw)
        problems += [_problem((*where, key), values[key], message) for key, message in found]
    return problems


def _key_pair_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    if values["cert_file"] is not None and values["key_file"] is None:
        return [("key_file", "must be set when cert_file is: the certificate's private key")]
    if values["key_file"] is not None and values["cert_file"] is None:
        return [("cert_file", "must be set when key_file is: the certificate of that key")]
    return []


def _client_cert_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    ca, auth = values["client_ca_file"], values["client_auth"]
    if values["cert_file"] is None:
        tls_off = "applies only with TLS on this listener; set cert_file and key_file"
        asked = [key for key in ("client_ca_file", "client_auth") if values[key] not in (None, "none")]
        return [(key, tls_off) for key in asked]
    if auth != "none" and ca is None:
        return [("client_auth", "needs client_ca_file, the CA bundle that client certificates must chain to")]
    if ca is not None and auth == "none":
        unused = "is not used while client_auth is none; set client_auth: optional or required"
        return [("client_ca_file", unused)]
    return []


def _upstream_ca_problems(values: Mapping[str, Any], raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    upstream = _section(raw, "upstream")
    verify = _INVALID if upstream is None else _field(UpstreamConfig, "tls_verify", upstream)
    if values["ca_file"] is not None and verify is False:
        return [("ca_file", "is not used while upstream.tls_verify is false (nothing is verified)")]
    return []


def _key_store_problems(raw: Mapping[str, Any]) -> list[InitErrorDetails]:
    section = _section(raw, "auth", "access_keys")
    stores = _INVALID if section is None else _field(AccessKeysConfig, "stores", section)
    if section is None or stores is _INVALID:
        return []
    where = ("auth", "access_keys")
    problems = []
    if "introspect" in stores and stores[-1] != "introspect":
        problems.append(
            _problem((*where, "stores"), list(stores), "'introspect' must come last: it answers for the rest")
        )
    if "redis" in stores:
        redis = _section(raw, "redis")
        if redis is not None and _field(RedisConfig, "url", redis) is None:
            problems.append(
                _problem((*where, "stores"), list(stores), "includes 'redis' but redis.url is not set")
            )
    file = _field(AccessKeysConfig, "file", section)
    if "file" in stores and not file:
        problems.append(_problem((*where, "file"), file, "must be set when stores includes 'file'"))
    peppers = [_field(AccessKeysConfig, name, section) for name in ("pepper_env", "pepper_file")]
    if {"redis", "file"} & set(stores) and _INVALID not in peppers and not any(peppers):
        problems.append(
            _problem(
                (*where, "pepper_env"),
                None,
                "keys stored by the gateway (stores redis or file) need pepper_env or pepper_file",
            )
        )
    return problems


def _can_verify(raw: Mapping[str, Any]) -> bool | None:
    """Whether any credential can be verified (JWT keys or key stores); None when that cannot be told."""
    jwt = _section(raw, "auth", "jwt")
    keys = _section(raw, "auth", "access_keys")
    if jwt is None or keys is None:
        return None
    jwt_keys = jwt.get("keys") or ()
    stores = _field(AccessKeysConfig, "stores", keys)
    if stores is _INVALID or not isinstance(jwt_keys, list | tuple):
        return None
    return bool(jwt_keys or stores)


def _cost_above_limit(cost: int, name: str, policy: PolicyConfig) -> str | None:
    """Why `cost` exceeds some variant of the policy (its own values, a credential type's, a plan's), or
    None. Every combination resolves to one of these values, so checking each alone covers them all. A
    limit of 0 blocks on purpose and is left alone."""
    field = "burst" if policy.algorithm == "gcra" else "limit"
    where = f"rate_limit.policies.{name}"
    variants: list[tuple[str, PolicyValues | PolicyConfig]] = [(where, policy)]
    variants += [(f"{where}.by_credential_type.{t}", v) for t, v in policy.by_credential_type.items()]
    variants += [(f"{where}.plans.{plan}", v) for plan, v in policy.plans.items()]
    for source, values in variants:
        value = getattr(values, field)
        if value is not None and 0 < value < cost:
            return (
                f"more than policy {name!r} ever admits at once ({source}.{field} = {value}), so such a "
                f"request could never pass; allowed: a cost of at most {value}, or a larger {field}"
            )
    return None
