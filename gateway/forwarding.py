"""Who the client is and what the upstream is told about it (X-Forwarded-*, hop-by-hop headers).

Pure: header sets in, header sets out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

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


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers, Proxy-* headers, whatever Connection names, and look-alike
    spellings of the framing headers."""
    named = {
        token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower.startswith("proxy-"):
            continue
        if "_" in lower and lower.replace("_", "-") in _FRAMING:
            continue
        out.add(name, value)
    return out


def drop_lookalikes(headers: CIMultiDict[str], names: frozenset[str] | set[str]) -> None:
    """Remove every header whose name, lower-cased and with "_" read as "-", is one of `names` (lower-case):
    CGI-style upstreams (WSGI, Rack, PHP) fold X_Gateway_Customer_Id into the same variable as
    X-Gateway-Customer-Id, so removing only the exact spelling would let a client set it."""
    for name in {n for n in headers if n.lower().replace("_", "-") in names}:
        headers.popall(name)


def add_forwarded(
    headers: CIMultiDict[str],
    *,
    peer: str | None,
    peer_trusted: bool,
    scheme: str,
    host: str | None,
) -> None:
    """Append X-Forwarded-For/-Proto/-Host; inbound values survive only from a trusted peer. Path and method
    overrides never do."""
    drop_lookalikes(headers, REQUEST_OVERRIDES if peer_trusted else _UNTRUSTED)
    previous = ", ".join(headers.popall("X-Forwarded-For", ()))
    if peer:
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
    elif previous:
        headers["X-Forwarded-For"] = previous
    headers.setdefault("X-Forwarded-Proto", scheme)
    if host:
        headers.setdefault("X-Forwarded-Host", host)
