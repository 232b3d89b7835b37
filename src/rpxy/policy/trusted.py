"""Membership test for ``trusted_forwarded_proxies``, and IP text canonicalisation.

Only a peer inside these networks may vouch for the client address in
X-Forwarded-For / Forwarded; everyone else's copies are discarded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["TrustedProxies", "canonical_ip", "parse_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Peers repeat (a load balancer, a CDN's few egress addresses), so answers are cached;
# the cache is simply emptied when full, which keeps it bounded without LRU bookkeeping.
_CACHE_LIMIT = 1024


def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an address, IPv4-mapped IPv6 (``::ffff:10.0.0.1``) unwrapped to IPv4.

    A dual-stack listener reports IPv4 peers in the mapped form; unwrapping makes
    them match IPv4 CIDRs and print the way users expect. Scope ids are dropped.
    Returns None for anything that is not an IP address.
    """
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version == 6:
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
        if addr.scope_id:
            return ipaddress.IPv6Address(text.partition("%")[0])
    return addr


def canonical_ip(text: str) -> str:
    """Canonical text of the address ``text`` (mapped IPv6 unwrapped, IPv6 compressed).

    IPv4 text (the common case) is returned as is without parsing; text that is
    not an address is returned unchanged.
    """
    if ":" not in text:
        return text
    addr = parse_ip(text)
    return text if addr is None else str(addr)


class TrustedProxies:
    """A set of CIDR networks (``trusted_forwarded_proxies``, aliases already expanded)."""

    __slots__ = ("_cache", "_v4", "_v6")

    def __init__(self, cidrs: Iterable[str]) -> None:
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            if isinstance(net, ipaddress.IPv4Network):
                v4.append(net)
            else:
                mapped = net.network_address.ipv4_mapped
                if mapped is not None and net.prefixlen >= 96:
                    # ::ffff:10.0.0.0/104 means 10.0.0.0/8: addresses get unwrapped.
                    v4.append(ipaddress.IPv4Network((mapped, net.prefixlen - 96), strict=False))
                else:
                    v6.append(net)
        self._v4 = tuple(v4)
        self._v6 = tuple(v6)
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def contains(self, ip: str) -> bool:
        """Whether the address text ``ip`` lies in a trusted network (False if not an IP)."""
        if not (self._v4 or self._v6):
            return False
        cache = self._cache
        hit = cache.get(ip)
        if hit is not None:
            return hit
        addr = parse_ip(ip)
        result = addr is not None and self.contains_addr(addr)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[ip] = result
        return result

    def contains_addr(self, addr: IPAddress) -> bool:
        """Like :meth:`contains` for an already parsed (and unwrapped) address."""
        if addr.version == 4:
            return any(addr in net for net in self._v4)
        return any(addr in net for net in self._v6)
