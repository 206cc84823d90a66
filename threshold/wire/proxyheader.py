"""HAProxy PROXY protocol headers, version 1 (text) and version 2 (binary).

The server writes one at the start of a tunneled stream so that the backend
learns the internet user's real address, not the tunnel client's. Format as
in haproxy's doc/proxy-protocol.txt. Pure code: no reactor, no I/O.

Addresses are normalised with :mod:`ipaddress` before they are written:
IPv4-mapped IPv6 (``::ffff:1.2.3.4``) becomes IPv4, a scope (``%eth0``) is
dropped, and a pair that mixes IPv4 with real IPv6 is written as IPv6 with
the IPv4 side mapped, because one header holds one family. Anything that is
not an IP address and port (a UNIX socket, ``None``) is written as UNKNOWN,
which tells the backend to use the connection's own addresses.
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

__all__ = [
    "V2_SIGNATURE",
    "ProxyHeaderError",
    "build",
    "build_v1",
    "build_v2",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# Byte 13: version 2 (high nibble) and command PROXY (low nibble).
_V2_PROXY = 0x21
# Byte 14: address family (high nibble) and transport (low nibble).
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_UNSPEC = 0x00

_V2_HEAD = struct.Struct("!12sBBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Endpoint = tuple[_IP, int]


class ProxyHeaderError(ValueError):
    """An address or version that no PROXY header can be built from."""


def _endpoint(which: str, address: object) -> _Endpoint | None:
    """Return the address as ``(ip, port)``, or None when it is not TCP/IP.

    An IPv4-mapped IPv6 address comes back as IPv4 and an IPv6 scope is
    dropped. A TCP/IP address whose host or port is not valid raises
    :class:`ProxyHeaderError`: that is a bug upstream, not an unknown family.
    """
    if not isinstance(address, IPv4Address | IPv6Address) or address.type != "TCP":
        return None
    host, port = address.host, address.port
    if not isinstance(host, str):
        raise ProxyHeaderError(f"{which} host {host!r} is not an IP address")
    try:
        # The scope ("fe80::1%eth0") means nothing to the backend.
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        raise ProxyHeaderError(f"{which} host {host!r} is not an IP address") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ProxyHeaderError(f"{which} port {port!r} is not in 0..65535")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def _as_v6(ip: _IP) -> ipaddress.IPv6Address:
    """Return an IPv4 address as IPv4-mapped IPv6, an IPv6 one unchanged."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    return ip


def _v6_text(ip: _IP) -> str:
    """Canonical text, with a mapped IPv4 in dotted form (RFC 5952, 5)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _pair(source: object, destination: object) -> tuple[_Endpoint, _Endpoint] | None:
    """Normalise both ends to one family; None when either is not TCP/IP."""
    src = _endpoint("source", source)
    dst = _endpoint("destination", destination)
    if src is None or dst is None:
        return None
    if src[0].version != dst[0].version:
        src = (_as_v6(src[0]), src[1])
        dst = (_as_v6(dst[0]), dst[1])
    return src, dst


def build_v1(
    source: IPv4Address | IPv6Address | IAddress | None,
    destination: IPv4Address | IPv6Address | IAddress | None,
) -> bytes:
    """Build a version 1 header: ``PROXY TCP4 <src> <dst> <sport> <dport>``.

    ``source`` is the user's address (the peer of the public listener),
    ``destination`` the listener's own address.
    """
    pair = _pair(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    (src_ip, src_port), (dst_ip, dst_port) = pair
    if isinstance(src_ip, ipaddress.IPv6Address):
        family, src_text, dst_text = "TCP6", _v6_text(src_ip), _v6_text(dst_ip)
    else:
        family, src_text, dst_text = "TCP4", str(src_ip), str(dst_ip)
    line = f"PROXY {family} {src_text} {dst_text} {src_port} {dst_port}\r\n"
    return line.encode("ascii")


def build_v2(
    source: IPv4Address | IPv6Address | IAddress | None,
    destination: IPv4Address | IPv6Address | IAddress | None,
) -> bytes:
    """Build a version 2 (binary) header with command PROXY and no TLVs.

    Unknown families are sent as command PROXY with family UNSPEC and an
    empty address block. The spec lets a receiver accept that (keeping the
    connection's own addresses, as HAProxy and nginx do) or refuse it; it
    cannot happen for the front end's TCP listeners.
    """
    pair = _pair(source, destination)
    if pair is None:
        return _V2_HEAD.pack(V2_SIGNATURE, _V2_PROXY, _V2_UNSPEC, 0)
    (src_ip, src_port), (dst_ip, dst_port) = pair
    if isinstance(src_ip, ipaddress.IPv4Address):
        family, block = _V2_TCP4, _V2_INET
    else:
        family, block = _V2_TCP6, _V2_INET6
    addresses = block.pack(src_ip.packed, dst_ip.packed, src_port, dst_port)
    return _V2_HEAD.pack(V2_SIGNATURE, _V2_PROXY, family, len(addresses)) + addresses


def build(
    version: int,
    source: IPv4Address | IPv6Address | IAddress | None,
    destination: IPv4Address | IPv6Address | IAddress | None,
) -> bytes:
    """Build a header of the given PROXY protocol version (1 or 2)."""
    if isinstance(version, bool) or version not in (1, 2):
        raise ProxyHeaderError(f"PROXY protocol version {version!r} is not 1 or 2")
    if version == 1:
        return build_v1(source, destination)
    return build_v2(source, destination)
