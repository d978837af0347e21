"""The key a client's address is counted under by per-IP policies: the network it belongs to.

One IPv6 host is usually given a whole /64 and may rotate through it at will, so counting IPv6 clients per
address lets one host meet no limit at all (and fill the in-process limiter table). As nginx, Cloudflare and
Envoy deployments do, IPv6 clients are counted per /64 by default, IPv4 clients per address. An IPv4-mapped
IPv6 address (::ffff:a.b.c.d, how a dual-stack listener sees an IPv4 client) counts as its IPv4 address.

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
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        prefix = self.ipv4 if ip.version == 4 else self.ipv6
        if prefix == ip.max_prefixlen:
            return str(ip)
        host_bits = ip.max_prefixlen - prefix
        network = type(ip)(int(ip) >> host_bits << host_bits)  # drops an IPv6 zone (%eth0) as well
        return f"{network}/{prefix}"
