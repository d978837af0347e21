"""Who the client is and what the upstream is told about it (X-Forwarded-*, hop-by-hop headers).

Pure: header sets in, header sets out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from multidict import CIMultiDict, CIMultiDictProxy

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 9110 §7.6.1; Proxy-* and the names a Connection header lists are removed as well.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
)
# Headers that tell who the client is and how it connected; from an untrusted peer they are dropped (and the
# X-Forwarded-* ones replaced).
CLIENT_HEADERS = frozenset(
    {
        "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
        "x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip",
        "client-ip", "x-cluster-client-ip", "fastly-client-ip", "x-originating-ip", "x-remote-ip",
        "x-remote-addr", "x-forwarded", "forwarded-for", "x-forwarded-port", "x-forwarded-server",
        "x-forwarded-ssl", "x-forwarded-scheme", "x-url-scheme", "front-end-https",
    }
)  # fmt: skip
# Headers that frameworks (Symfony, Laravel, IIS, Express' method-override, ...) read as the request's real
# path or method: they would take a request somewhere the route table never matched, so they are removed
# whoever sent them (a trusted proxy passes its client's headers on too).
REQUEST_OVERRIDES = frozenset(
    {
        "x-original-url", "x-rewrite-url", "x-original-uri", "x-forwarded-uri", "x-forwarded-path",
        "x-forwarded-prefix", "x-envoy-original-path",
        "x-http-method-override", "x-http-method", "x-method-override",
    }
)  # fmt: skip
_UNTRUSTED = CLIENT_HEADERS | REQUEST_OVERRIDES
# Framing headers: a look-alike spelling (Content_Length) is one to upstreams that fold "_" into "-".
_FRAMING = HOP_BY_HOP | {"content-length"}


class TrustedProxies:
    """The CIDRs whose X-Forwarded-* headers are believed."""

    __slots__ = ("_networks",)

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str | None) -> bool:
        if not self._networks or not address:
            return False
        ip = _parse_ip(address)
        return ip is not None and any(ip in net for net in self._networks)

    def client_ip(self, peer: str | None, x_forwarded_for: str | None) -> str | None:
        """The first address, from the right, that is not one of our trusted proxies (IPv4-mapped addresses
        written as plain IPv4, so one client is one rate-limit key whichever way it connected)."""
        if self.trusts(peer) and x_forwarded_for:
            hops = [h.strip() for h in x_forwarded_for.split(",") if h.strip()]
            untrusted = next(
                (hop for hop in reversed(hops) if not self.trusts(hop)), hops[0] if hops else None
            )
            if untrusted is not None and (ip := _parse_ip(untrusted)) is not None:
                return str(ip)
        ip = _parse_ip(peer) if peer else None
        return str(ip) if ip is not None else peer


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    # A dual-stack listener ([::]) sees IPv4 peers as ::ffff:a.b.c.d; they must match IPv4 networks.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def strip_hop_by_hop(
    headers: CIMultiDictProxy[str] | CIMultiDict[str] | Sequence[tuple[str, str]],
) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers, Proxy-* headers, whatever Connection names, and look-alike
    spellings of the framing headers. `headers` may also be (name, value) pairs, as a response head is."""
    return CIMultiDict(end_to_end(headers if isinstance(headers, Sequence) else headers.items()))


def end_to_end(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (name, value) pairs strip_hop_by_hop keeps, for a caller that copies them somewhere itself. One
    pass: a Connection header (rare on responses) is only looked into when there is one."""
    kept: list[tuple[str, str]] = []
    named: set[str] = set()
    for name, value in items:
        lower = name.lower()
        if lower == "connection":
            named.update(token.strip().lower() for token in value.split(","))
        elif not _hop_by_hop(lower, _NOTHING):
            kept.append((name, value))
    if named:
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


def forward_headers(
    headers: CIMultiDictProxy[str],
    *,
    peer: str | None,
    peer_trusted: bool,
    scheme: str,
    request_id: str,
    overrides: Mapping[str, str | None],
) -> tuple[list[tuple[str, str]], str | None]:
    """The client's request headers as the upstream receives them, and the client's Host (not among them).

    In one pass: hop-by-hop headers go (as strip_hop_by_hop), and so do Expect (the gateway answered it) and
    the client's X-Request-ID (`request_id` replaces it). X-Forwarded-For/-Proto/-Host are appended, and
    inbound values survive only from a trusted peer; path and method overrides never do. `overrides` are
    set last (a None value only removes). Client, override and `overrides` headers are matched in every
    spelling: CGI-style upstreams (WSGI, Rack, PHP) fold X_Gateway_Customer_Id into the same variable as
    X-Gateway-Customer-Id, so removing only the exact spelling would let a client set it.
    """
    items = headers.items()
    named = _connection_names(items) if "Connection" in headers else _NOTHING
    dropped = REQUEST_OVERRIDES if peer_trusted else _UNTRUSTED
    replaced = {name.lower().replace("_", "-") for name in overrides}
    out: list[tuple[str, str]] = []
    host: str | None = None
    forwarded_for: list[str] = []
    has_proto = has_host = False
    for name, value in items:
        lower = name.lower()
        if _hop_by_hop(lower, named):
            continue
        folded = lower.replace("_", "-") if "_" in lower else lower
        if folded in dropped or folded in replaced:
            continue
        if lower in _ANSWERED_HERE:
            if lower == "host" and host is None:
                host = value
            continue
        if lower == "x-forwarded-for":  # from a trusted peer: untrusted ones are in `dropped`
            forwarded_for.append(value)
            continue
        if lower == "x-forwarded-proto":
            has_proto = True
        elif lower == "x-forwarded-host":
            has_host = True
        out.append((name, value))
    out.append(("X-Request-ID", request_id))
    previous = ", ".join(forwarded_for)
    if peer:
        out.append(("X-Forwarded-For", f"{previous}, {peer}" if previous else peer))
    elif previous:
        out.append(("X-Forwarded-For", previous))
    if not has_proto:
        out.append(("X-Forwarded-Proto", scheme))
    if host and not has_host:
        out.append(("X-Forwarded-Host", host))
    for name, value in overrides.items():
        if value is not None:
            if not value.isprintable():  # identities are checked where they are read; a bug, never a header
                raise ValueError(f"{name}: a header value the gateway sets must be printable")
            out.append((name, value))
    return out, host


_NOTHING: frozenset[str] = frozenset()
# Not forwarded as the client sent them: Host is the upstream's (or preserved by the caller), Expect was
# answered by the gateway, the request id is the gateway's.
_ANSWERED_HERE = frozenset({"host", "expect", "x-request-id"})


def _connection_names(items: Iterable[tuple[str, str]]) -> frozenset[str] | set[str]:
    """The header names a Connection header lists (hop-by-hop too)."""
    return {
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
    }


def _hop_by_hop(lower: str, named: frozenset[str] | set[str]) -> bool:
    if lower in HOP_BY_HOP or lower in named or lower.startswith("proxy-"):
        return True
    return "_" in lower and lower.replace("_", "-") in _FRAMING
