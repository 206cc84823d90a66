"""The framing of UDP flows on a stream, and the PROXY v2 header of a flow.

After its header line, a UDP flow's stream carries whole datagrams, both
ways, each as a 2-byte big-endian length and that many bytes (docs/udp.md).
A length prefix keeps each datagram whole on a byte stream: a datagram is
never merged with the next one nor split, whatever the Data frames that
carry it. A length of 0 is an empty datagram (valid in UDP).

Pure code, no reactor: :func:`encode` frames one datagram,
:class:`DatagramDecoder` turns stream bytes back into datagrams, bounded
(it holds at most one incomplete datagram) and never raising past
:meth:`DatagramDecoder.feed` except with :class:`FramingError`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = [
    "LENGTH_PREFIX",
    "MAX_DATAGRAM",
    "MAX_PROXY_HEADER",
    "DatagramDecoder",
    "FramingError",
    "build_proxy_v2_dgram",
    "check_proxy_v2",
    "encode",
    "set_buffers",
]

#: Bytes of the length prefix.
LENGTH_PREFIX = 2
#: The largest datagram a 2-byte prefix can carry. The largest UDP payload
#: over IPv4 is 65507 bytes; the gateway's ``UdpMaxDatagramBytes`` bounds it
#: further.
MAX_DATAGRAM = 0xFFFF
#: The longest PROXY v2 header a flow may carry (the spec's 16 + 520 bytes).
MAX_PROXY_HEADER = 536

_PREFIX = struct.Struct("!H")

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21
# Family (high nibble) and transport DGRAM (low nibble 2).
_V2_UDP4 = 0x12
_V2_UDP6 = 0x22
_V2_HEAD = struct.Struct("!12sBBH")


class FramingError(ValueError):
    """Stream bytes that are not a valid sequence of framed datagrams."""


def encode(datagram: bytes) -> bytes:
    """One datagram with its length prefix; refuses one over ``MAX_DATAGRAM``."""
    size = len(datagram)
    if size > MAX_DATAGRAM:
        raise FramingError(f"datagram of {size} bytes is over {MAX_DATAGRAM}")
    return _PREFIX.pack(size) + bytes(datagram)


class DatagramDecoder:
    """Cut a stream's bytes into datagrams, whatever the chunking.

    ``max_size`` bounds each datagram (at most ``MAX_DATAGRAM``); a length
    over it is a :class:`FramingError` (the peer does not speak this
    framing, or lies), after which the decoder refuses everything.
    """

    __slots__ = ("max_size", "_buffer", "_failed")

    def __init__(self, max_size: int = MAX_DATAGRAM) -> None:
        if not 0 <= max_size <= MAX_DATAGRAM:
            raise ValueError(f"max_size must be in 0..{MAX_DATAGRAM}")
        self.max_size = max_size
        self._buffer = b""
        self._failed: str | None = None

    @property
    def pending(self) -> int:
        """Bytes held: the start of a datagram not complete yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the datagrams it completed, in order."""
        if self._failed is not None:
            raise FramingError(self._failed)
        buffer = self._buffer + bytes(data) if self._buffer else bytes(data)
        out: list[bytes] = []
        offset = 0
        end = len(buffer)
        while end - offset >= LENGTH_PREFIX:
            (size,) = _PREFIX.unpack_from(buffer, offset)
            if size > self.max_size:
                self._buffer = b""
                self._failed = (
                    f"framed datagram of {size} bytes is over the limit of"
                    f" {self.max_size}"
                )
                raise FramingError(self._failed)
            stop = offset + LENGTH_PREFIX + size
            if stop > end:
                break
            out.append(buffer[offset + LENGTH_PREFIX : stop])
            offset = stop
        self._buffer = buffer[offset:]
        return out


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _as_v6(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    return ip


def build_proxy_v2_dgram(
    source: tuple[str, int], destination: tuple[str, int]
) -> bytes:
    """A PROXY v2 header, command PROXY, family UDP4 or UDP6 (DGRAM), no TLVs.

    ``source`` is the user's (host, port), ``destination`` the gateway's
    listening address. IPv4-mapped IPv6 is written as IPv4; a pair mixing
    IPv4 with real IPv6 is written as IPv6 (one header holds one family).
    Raises ``ValueError`` for a host that is not an IP address.
    """
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    if isinstance(src, ipaddress.IPv4Address):
        family, block = _V2_UDP4, struct.Struct("!4s4sHH")
    else:
        family, block = _V2_UDP6, struct.Struct("!16s16sHH")
    addresses = block.pack(src.packed, dst.packed, source[1], destination[1])
    return _V2_HEAD.pack(_V2_SIGNATURE, _V2_PROXY, family, len(addresses)) + addresses


def check_proxy_v2(header: bytes) -> str | None:
    """Why ``header`` is not one whole PROXY v2 header, or None when it is."""
    if len(header) > MAX_PROXY_HEADER:
        return f"PROXY header of {len(header)} bytes is over {MAX_PROXY_HEADER}"
    if len(header) < _V2_HEAD.size or not header.startswith(_V2_SIGNATURE):
        return "not a PROXY protocol v2 header"
    (_, _, _, length) = _V2_HEAD.unpack_from(header)
    if _V2_HEAD.size + length != len(header):
        return "PROXY v2 header length does not match"
    return None


def set_buffers(port: object, size: int) -> None:
    """Ask for ``size`` bytes of kernel buffer each way on a UDP port's socket.

    Best effort: the kernel caps it (``net.core.rmem_max``/``wmem_max``);
    an object without a ``socket`` (a test double) is left alone.
    """
    handle = getattr(port, "socket", None)
    if handle is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            handle.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass
