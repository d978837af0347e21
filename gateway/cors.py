"""CORS as the gateway answers it (the Fetch standard's CORS protocol): which origins a policy allows, the
answer to a preflight, and the headers of every other response. Pure: strings in, header maps out.

An allowed origin is `*` (any), an exact origin (`https://app.example.com`), or a pattern whose host starts
with `*.` (`https://*.example.com`), where `*` stands for one or more whole DNS labels: `https://a.example.com`
and `https://a.b.example.com` match, `https://example.com` and `https://evilexample.com` do not. Scheme and
port are never wildcards: an origin matches only with the entry's scheme and port (a scheme's default port,
written or not, is the same origin). Scheme and host compare in any letter case, as URLs do; the answer
echoes the Origin exactly as it came. A value that is not `scheme://host[:port]` in ASCII (a path, user
info, a trailing dot or slash, `null`, a list) matches nothing but `*`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from multidict import CIMultiDict

if TYPE_CHECKING:
    from gateway.config import CorsConfig

ANY = "*"
VARY_ACTUAL = "Origin"
VARY_PREFLIGHT = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
EXPOSED_BY_DEFAULT = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "X-Request-ID",
)
EXPOSED_IETF = ("RateLimit", "RateLimit-Policy")
"""Exposed by default too when rate_limit.ietf_headers sends them."""

_ALLOW_ORIGIN = "Access-Control-Allow-Origin"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*)"  # no empty label: no leading or trailing dot
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int | None
    """None for the scheme's default port, written or not."""


class OriginPattern(NamedTuple):
    scheme: str
    suffix: str
    """".example.com" for https://*.example.com: what a matching host ends with, after one label or more."""
    port: int | None


def parse_origin(value: str) -> Origin | None:
    """An Origin header's scheme, host and port, in lower case; None when it is not one browsers send."""
    # ASCII first: str.lower() folds some other letters onto ASCII ones (the Kelvin sign onto "k").
    match = _ORIGIN.fullmatch(value.lower()) if value.isascii() else None
    if match is None:
        return None
    scheme, port = match["scheme"], match["port"]
    number = None if port is None else int(port)
    if number is not None and number > 65535:
        return None
    return Origin(scheme, match["host"], None if number == _DEFAULT_PORTS.get(scheme) else number)


def parse_allowed_origin(entry: str) -> Origin | OriginPattern:
    """One allow_origins entry other than "*"; ValueError saying what is wrong with it (the caller names the
    entry)."""
    if entry.lower() == "null":
        raise ValueError(
            "'null' is the origin of sandboxed iframes, file: pages and data: URLs on any site, so allowing "
            "it allows them all; to let any origin call, use '*' (without credentials)"
        )
    if not entry.isascii():
        raise ValueError("write an internationalized host name in its xn-- (punycode) form")
    wildcard = "://*." in entry
    exact = entry.replace("://*.", "://", 1) if wildcard else entry
    if "*" in exact:
        raise ValueError("'*' may only stand for the leading labels of a host, as in https://*.example.com")
    origin = parse_origin(exact)
    if origin is None:
        raise ValueError(
            "is not an origin: scheme://host[:port] without path or trailing slash, such as "
            "https://app.example.com or http://localhost:3000"
        )
    if not wildcard:
        return origin
    labels = origin.host.split(".")
    if origin.host.startswith("[") or len(labels) < 2 or labels[-1].isdigit():
        raise ValueError(
            "a pattern needs a domain name of two labels or more after '*.', such as https://*.example.com"
        )
    return OriginPattern(origin.scheme, "." + origin.host, origin.port)


def is_header_name(value: str) -> bool:
    return _HEADER_NAME.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class PreflightAnswer:
    headers: dict[str, str]
    """The CORS headers of the 204; empty when refused."""
    refused: str | None = None
    """Why the preflight is refused, for the envelope's message."""


class CorsPolicy:
    """One route's compiled policy (or the global one, for paths that do not route)."""

    __slots__ = (
        "_allow_headers",
        "_allow_methods",
        "_any_header",
        "_any_origin",
        "_granted",
        "_headers",
        "_methods",
        "_origins",
        "_patterns",
        "_preflight",
    )

    def __init__(self, config: CorsConfig, *, route_methods: Iterable[str], ietf_headers: bool) -> None:
        self._any_origin = ANY in config.allow_origins
        allowed = [parse_allowed_origin(entry) for entry in config.allow_origins if entry != ANY]
        self._origins = frozenset(entry for entry in allowed if isinstance(entry, Origin))
        self._patterns = tuple(entry for entry in allowed if isinstance(entry, OriginPattern))
        methods = config.allow_methods if config.allow_methods is not None else route_methods
        self._methods = frozenset(methods)
        self._allow_methods = ", ".join(sorted(self._methods))
        self._any_header = ANY in config.allow_headers
        self._headers = frozenset(name.lower() for name in config.allow_headers)
        self._allow_headers = ", ".join(config.allow_headers)
        exposed = config.expose_headers
        if exposed is None:
            exposed = EXPOSED_BY_DEFAULT + (EXPOSED_IETF if ietf_headers else ())
        credentials = {"Access-Control-Allow-Credentials": "true"} if config.allow_credentials else {}
        # What every answer to an allowed origin carries besides Access-Control-Allow-Origin.
        self._granted = {**credentials, "Vary": VARY_ACTUAL}
        if exposed:
            self._granted["Access-Control-Expose-Headers"] = ", ".join(exposed)
        self._preflight = {
            **credentials,
            "Access-Control-Allow-Methods": self._allow_methods,
            "Access-Control-Max-Age": str(config.max_age),
            "Vary": VARY_PREFLIGHT,
        }

    @classmethod
    def compile(
        cls, config: CorsConfig, *, route_methods: Iterable[str], ietf_headers: bool
    ) -> CorsPolicy | None:
        """The policy, or None when it allows no origin: CORS is then off (left to the upstream)."""
        if not config.allow_origins:
            return None
        return cls(config, route_methods=route_methods, ietf_headers=ietf_headers)

    def allows(self, origin: str) -> bool:
        if self._any_origin:
            return True
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        if parsed in self._origins:
            return True
        scheme, host, port = parsed
        return any(p.scheme == scheme and p.port == port and host.endswith(p.suffix) for p in self._patterns)

    def actual(self, origin: str) -> dict[str, str]:
        """The headers of every response to a request (not a preflight) with this Origin. A refused origin
        gets none of CORS's, only Vary: the answer depends on the Origin, and a cache that ignored it could
        hand an allowed origin the refused (header-less) one."""
        if not self.allows(origin):
            return {"Vary": VARY_ACTUAL}
        return {_ALLOW_ORIGIN: self._allow_origin(origin), **self._granted}

    def preflight(self, origin: str, method: str, request_headers: str | None) -> PreflightAnswer:
        """The answer to a preflight: its Access-Control-Request-Method and -Headers are checked in turn
        against the policy (methods compare in their case, as the Fetch standard does; header names in
        any)."""
        if not self.allows(origin):
            return PreflightAnswer({}, f"Origin {origin[:200]!r} may not call this API from a browser.")
        if method not in self._methods:
            return PreflightAnswer(
                {},
                f"Method {method[:32]!r} is not allowed in cross-origin requests here; "
                f"allowed: {self._allow_methods}.",
            )
        names = [n.strip().lower() for n in (request_headers or "").split(",") if n.strip()]
        for name in names:
            if not is_header_name(name):
                return PreflightAnswer(
                    {}, f"{name[:64]!r} in Access-Control-Request-Headers is not a header name."
                )
            if not (self._any_header or name in self._headers):
                return PreflightAnswer(
                    {},
                    f"Request header {name[:64]!r} is not allowed in cross-origin requests here; "
                    f"allowed: {self._allow_headers or 'none'}.",
                )
        headers = {_ALLOW_ORIGIN: self._allow_origin(origin), **self._preflight}
        # "*" is answered with the names asked for: the Fetch standard reads a literal "*" as a wildcard only
        # without credentials, and never lets it cover Authorization.
        allow_headers = ", ".join(names) if self._any_header else self._allow_headers
        if allow_headers:
            headers["Access-Control-Allow-Headers"] = allow_headers
        return PreflightAnswer(headers)

    def _allow_origin(self, origin: str) -> str:
        # "*" only where credentials are not allowed (the config refuses both), so it can be sent as it is.
        return ANY if self._any_origin else origin


def take_over_upstream_cors(upstream: CIMultiDict[str], ours: CIMultiDict[str]) -> None:
    """For a proxied response to a request whose CORS the gateway answers: the upstream's Access-Control-*
    headers go (the gateway's answer, or none for a refused origin, stands alone), and its Vary joins the
    gateway's in `ours`, which would otherwise replace it."""
    for name in {name for name in upstream if name[:15].lower() == "access-control-"}:
        upstream.popall(name, None)
    vary = upstream.popall("Vary", None)
    if vary:
        ours["Vary"] = join_vary([*vary, *ours.getall("Vary", ())])


def join_vary(values: Iterable[str]) -> str:
    """Vary header values as one, each field name once (in any letter case); "*" stands for them all."""
    names: dict[str, str] = {}
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name == ANY:
                return ANY
            if name:
                names.setdefault(name.lower(), name)
    return ", ".join(names.values())
