"""The key a client's address is counted under by per-IP policies: the network it belongs to.

One IPv6 host is usually given a whole /64 and may rotate through it at will, so counting IPv6 clients per
address lets one host meet no limit at all (and fill the in-process limiter table). As nginx, Cloudflare and
Envoy deployments do, IPv6 clients are counted per /64 by default, IPv4 clients per address. Two kinds of
IPv6 address are not a host's own /64 and are keyed otherwise:

- addresses that stand for an IPv4 client count as that IPv4 address: IPv4-mapped (::ffff:a.b.c.d, how a
  dual-stack listener sees an IPv4 client), NAT64's well-known prefix (64:ff9b::/96, RFC 6052: IPv4 clients
  reaching an IPv6-only service), 6to4 and Teredo (the IPv4 site or NAT a tunnel starts from);
- loopback, link-local and unique local addresses (fc00::/7) count per address: those networks are assigned
  by the operator, and one /64 of them holds many hosts (a Kubernetes node's pods, an office LAN).

Pure: an address in, a key out. Keys are cached: the same clients come back request after request, and an
uncached address costs a few microseconds of parsing.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

DEFAULT_IPV4_PREFIX = 32
DEFAULT_IPV6_PREFIX = 64
_CACHE_SIZE = 4096


class IpPrefixes:
    """`key(address)`: the address itself at a full-length prefix (/32, /128: one key per address), else
    its network in CIDR notation (`2001:db8:1:2::/64`). Text that is not an IP address (a Unix socket's
    peer) is its own key."""

    __slots__ = ("ipv4", "ipv6", "key")

    def __init__(self, ipv4: int = DEFAULT_IPV4_PREFIX, ipv6: int = DEFAULT_IPV6_PREFIX) -> None:
        if not 0 <= ipv4 <= 32:
            raise ValueError(f"ipv4 prefix must be 0-32, not {ipv4}")
        if not 0 <= ipv6 <= 128:
            raise ValueError(f"ipv6 prefix must be 0-128, not {ipv6}")
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.key: Callable[[str], str] = functools.lru_cache(maxsize=_CACHE_SIZE)(self._key)

    def _key(self, address: str) -> str:
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            ip = _embedded_ipv4(ip) or ip
        if isinstance(ip, ipaddress.IPv4Address):
            prefix = self.ipv4
        elif ip.is_loopback or ip.is_link_local or ip in _UNIQUE_LOCAL:
            prefix = ip.max_prefixlen
        else:
            prefix = self.ipv6
        host_bits = ip.max_prefixlen - prefix
        network = type(ip)(int(ip) >> host_bits << host_bits)  # without an IPv6 zone (%eth0): not a client
        return str(network) if host_bits == 0 else f"{network}/{prefix}"


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo is not None else None
