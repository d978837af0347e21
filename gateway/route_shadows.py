"""Where the route table lets a request past a route's protection: `check-config`'s warnings.

Pure: compiled routes in, one sentence per problem out. Three ways a route can be bypassed:

- it is shadowed: a route listed before it takes some of the same requests and protects them less;
- it is `case_sensitive`: other spellings of its paths go on down the table, and reach a less protected
  route that takes them, while an upstream that ignores case serves them as the protected path;
- it is reached upstream: a less protected route sends requests to the same upstream under its paths,
  because one of the two changes the path on the way (strip_prefix / rewrite_prefix, or an upstream URL with
  a path of its own), so the route table's order between them protects nothing.

"Less protected" means a weaker `auth` mode, weaker `require`ments, or rate-limit policies left out (where
the route asks no more of the caller in auth and require).
Routes whose paths share a segment with a `{name}` in it are taken to overlap: a warning can be too eager
there, never silent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

from gateway.config import RouteRequirements
from gateway.routing import Route, template_regex

_AUTH_RANK = {"none": 0, "optional": 1, "required": 2}
_VARIABLE = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


class _Paths(NamedTuple):
    """A set of paths as a route's template spells them: `template`, or with `prefix` anything below it."""

    template: str
    prefix: bool


class _UpstreamSide(NamedTuple):
    upstream: str
    """What identifies the upstream: its pool, or its URL's origin."""
    base: str
    """The upstream URL's own path, which goes before every target."""
    paths: _Paths
    """What the route can send there, base included."""
    rewrites: bool
    """strip_prefix / rewrite_prefix."""


def route_warnings(routes: Sequence[Route]) -> list[str]:
    warnings: list[str] = []
    sides = [_upstream_side(route) for route in routes]
    for j, protected in enumerate(routes):
        for i, other in enumerate(routes):
            if i == j or not _methods_meet(other, protected):
                continue
            weaker = _weaker(other, protected)
            if not weaker:
                continue
            exact_case = other.case_sensitive and protected.case_sensitive
            if i < j and _overlap(other, protected, ignore_case=not exact_case):
                warnings.append(
                    f"{_name(j, protected)}: requests for {protected.template} also match {_name(i, other)}, "
                    f"which comes first and is less protected ({weaker}); list {_name(j, protected)} first"
                )
            elif protected.case_sensitive and _overlap(other, protected, ignore_case=True):
                warnings.append(
                    f"{_name(j, protected)} is case_sensitive: {protected.template} spelt in other letter "
                    f"case can reach {_name(i, other)}, which is less protected ({weaker}), and an upstream "
                    "that ignores case serves it as the protected path"
                )
            reached = _reached_upstream(sides[i], sides[j])
            if reached is not None:
                warnings.append(
                    f"{_name(i, other)} forwards to {_show(sides[i].paths)} on upstream {sides[i].upstream}, "
                    f"so also to {_show(reached)}, which {_name(j, protected)} sends there with more "
                    f"protection: through {_name(i, other)} it is less protected ({weaker})"
                )
    return warnings


def _upstream_side(route: Route) -> _UpstreamSide:
    if route.pool is not None:
        upstream, base = f"pool {route.pool!r}", ""
    else:
        upstream, base = _origin(route.upstream), urlsplit(route.upstream).path
    if route.rewrite is not None:  # its replacement ("/" for a strip), then anything the client sent
        template, prefix = route.rewrite.replacement or "/", True
    else:
        template, prefix = route.template, route.prefix
    path = base + template if template.strip("/") else base or "/"
    return _UpstreamSide(upstream, base, _Paths(path, prefix), route.rewrite is not None)


def _origin(url: str) -> str:
    """The server a URL names, host lower-cased and default port spelt out: one, however it is written."""
    parts = urlsplit(url)  # a valid upstream URL (config.py): its port, if any, is a number
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _reached_upstream(other: _UpstreamSide, protected: _UpstreamSide) -> _Paths | None:
    """The protected route's upstream paths that `other` also sends there, as the more specific of the
    two templates; None if none. Two routes that send their paths as they match them, after the same base,
    are the route table's to order."""
    if other.upstream != protected.upstream:
        return None
    if not (other.rewrites or protected.rewrites) and other.base == protected.base:
        return None
    # Letter case ignored: the rewritten part is the client's spelling, and an upstream may ignore case.
    if not _overlap(other.paths, protected.paths, ignore_case=True):
        return None
    return other.paths if len(_segments(other.paths)) > len(_segments(protected.paths)) else protected.paths


def _show(paths: _Paths) -> str:
    return f"{paths.template.rstrip('/')}/..." if paths.prefix else paths.template


def _name(index: int, route: Route) -> str:
    return f"routes[{index}] ({route.name!r})"


def _methods_meet(a: Route, b: Route) -> bool:
    if a.methods is None or b.methods is None:
        methods = a.methods if b.methods is None else b.methods
        return methods is None or any(m != "TRACE" for m in methods)
    return bool(a.methods & b.methods)


def _weaker(other: Route, protected: Route) -> str:
    """How `other` protects a request less than `protected` does ("" if it does not). A route that asks
    more of the caller in auth or require bypasses nothing, whatever its rate limits."""
    if _AUTH_RANK[other.auth] > _AUTH_RANK[protected.auth] or not _at_least_as_strict(
        protected.require, other.require
    ):
        return ""
    reasons: list[str] = []
    if _AUTH_RANK[other.auth] < _AUTH_RANK[protected.auth]:
        reasons.append(f"auth: {other.auth} instead of {protected.auth}")
    if not _at_least_as_strict(other.require, protected.require):
        reasons.append("weaker require")
    policies = set(other.rate_limit_before_auth + other.rate_limit_after_auth)
    missing = [
        p for p in protected.rate_limit_before_auth + protected.rate_limit_after_auth if p not in policies
    ]
    if missing:
        reasons.append(f"no rate_limit {', '.join(missing)}")
    return "; ".join(reasons)


def _at_least_as_strict(a: RouteRequirements, b: RouteRequirements) -> bool:
    if b.credential_types and not (a.credential_types and set(a.credential_types) <= set(b.credential_types)):
        return False
    for path, wanted in b.claims.items():
        if path not in a.claims or not set(_values(a.claims[path])) <= set(_values(wanted)):
            return False
    return True


def _values(wanted: str | tuple[str, ...]) -> tuple[str, ...]:
    return (wanted,) if isinstance(wanted, str) else wanted


def _overlap(a: Route | _Paths, b: Route | _Paths, *, ignore_case: bool) -> bool:
    """Whether some path matches both routes."""
    sa, sb = _segments(a), _segments(b)
    if not all(_segments_meet(x, y, ignore_case) for x, y in zip(sa, sb, strict=False)):
        return False
    if len(sa) == len(sb):
        return True
    return a.prefix if len(sa) < len(sb) else b.prefix  # only a prefix takes the longer one's segments


def _segments(route: Route | _Paths) -> list[str]:
    trimmed = route.template.strip("/")
    return trimmed.split("/") if trimmed else []


def _segments_meet(x: str, y: str, ignore_case: bool) -> bool:
    x_varies, y_varies = bool(_VARIABLE.search(x)), bool(_VARIABLE.search(y))
    if x_varies and y_varies:
        return True
    flags = re.IGNORECASE if ignore_case else 0
    if x_varies or y_varies:
        template, literal = (x, y) if x_varies else (y, x)
        return re.fullmatch(template_regex(template), literal, flags) is not None
    return x.casefold() == y.casefold() if ignore_case else x == y
