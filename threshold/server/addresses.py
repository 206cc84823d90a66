"""Source addresses as limits count them: one key per home, whatever the socket.

A per-source limit must count one user once. On a dual-stack (``"::"``)
listener an IPv4 user appears as ``::ffff:a.b.c.d``; and one IPv6 home
holds a whole /64 (any of its 2**64 addresses is one ``ip`` away), so
IPv6 sources are grouped by a prefix, as rate limiters do. Pure: no reactor.
"""

from __future__ import annotations

import ipaddress

__all__ = ["DEFAULT_IPV6_PREFIX", "UNKNOWN_SOURCE", "source_key", "source_of"]

#: IPv6 sources sharing this many leading bits are one source (a /64 home).
DEFAULT_IPV6_PREFIX = 64

#: The key of a peer without an IP address (a Unix socket, a test transport).
UNKNOWN_SOURCE = "unknown"


def source_key(host: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The key a per-source limit counts ``host`` under.

    An IPv4 address (also written IPv4-mapped, ``::ffff:a.b.c.d``) is
    itself; an IPv6 address is its ``/ipv6_prefix`` network
    (``2001:db8:1:2::/64``); a zone (``fe80::1%eth0``) is dropped. Anything
    that is not an IP address is returned unchanged.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if ipv6_prefix >= 128:
            return str(address)
        network = ipaddress.IPv6Network((address, ipv6_prefix), strict=False)
        return str(network)
    return str(address)


def source_of(address: object, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The source key of a Twisted address (``IPv4Address``, ``IPv6Address``)."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return UNKNOWN_SOURCE
    return source_key(host, ipv6_prefix)
