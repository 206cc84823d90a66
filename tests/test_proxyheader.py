"""Tests for threshold.proxyheader, checked against an independent parser."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st
from proxyprotocol.result import (
    ProxyResult,
    ProxyResultIPv4,
    ProxyResultIPv6,
    ProxyResultUnknown,
)
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from threshold.wire.proxyheader import (
    V2_SIGNATURE,
    ProxyHeaderError,
    build,
    build_v1,
    build_v2,
)


def v4(host: str, port: int) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def v6(host: str, port: int) -> IPv6Address:
    return IPv6Address("TCP", host, port)


def parse_v1(header: bytes) -> ProxyResult:
    """Parse a whole v1 line with the proxy-protocol package."""
    parser = ProxyProtocolV1()
    assert parser.is_valid(header[:8])
    return parser.unpack(header)


def parse_v2(header: bytes) -> ProxyResult:
    """Parse a whole v2 header with the proxy-protocol package."""
    parser = ProxyProtocolV2()
    assert parser.is_valid(header[:8])
    return parser.unpack(header)


def endpoints(result: ProxyResult) -> tuple[tuple[str, int], tuple[str, int]]:
    """The parsed (ip, port) pairs, the ips as text."""
    (src_ip, src_port), (dst_ip, dst_port) = result.source, result.dest
    return (str(src_ip), src_port), (str(dst_ip), dst_port)


class KnownVectorTests(SynchronousTestCase):
    """Exact bytes for examples written out in the PROXY protocol spec."""

    def test_v1_tcp4_example(self):
        """The spec's TCP4 example line is produced byte for byte."""
        self.assertEqual(
            build_v1(v4("192.168.0.1", 56324), v4("192.168.0.11", 443)),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        )

    def test_v1_worst_case_lengths(self):
        """The spec's longest TCP4 and TCP6 lines fit its 107-byte bound."""
        tcp4 = build_v1(v4("255.255.255.255", 65535), v4("255.255.255.255", 65535))
        self.assertEqual(
            tcp4, b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
        )
        full = ":".join(["ffff"] * 8)
        tcp6 = build_v1(v6(full, 65535), v6(full, 65535))
        self.assertEqual(
            tcp6, f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode("ascii")
        )
        self.assertLessEqual(len(tcp6), 107)

    def test_v1_unknown(self):
        """Addresses that are not TCP/IP give the spec's UNKNOWN line."""
        self.assertEqual(build_v1(None, v4("1.2.3.4", 1)), b"PROXY UNKNOWN\r\n")

    def test_v2_tcp4_layout(self):
        """A v2 TCP4 header is signature, 0x21, 0x11, length 12, addresses."""
        header = build_v2(v4("192.168.0.1", 56324), v4("192.168.0.11", 443))
        self.assertEqual(
            header,
            b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
            b"\x21\x11\x00\x0c"
            b"\xc0\xa8\x00\x01\xc0\xa8\x00\x0b"
            b"\xdc\x04\x01\xbb",
        )

    def test_v2_tcp6_layout(self):
        """A v2 TCP6 header has family 0x21 and a 36-byte address block."""
        header = build_v2(v6("2001:db8::1", 1), v6("2001:db8::2", 2))
        self.assertEqual(header[:16], V2_SIGNATURE + b"\x21\x21\x00\x24")
        self.assertEqual(
            header[16:],
            ipaddress.IPv6Address("2001:db8::1").packed
            + ipaddress.IPv6Address("2001:db8::2").packed
            + b"\x00\x01\x00\x02",
        )

    def test_v2_unknown_layout(self):
        """An unknown family is command PROXY, family UNSPEC, no addresses."""
        self.assertEqual(
            build_v2(UNIXAddress(b"/run/x.sock"), None),
            V2_SIGNATURE + b"\x21\x00\x00\x00",
        )


class IndependentParserTests(SynchronousTestCase):
    """Headers read back by the proxy-protocol package give our addresses."""

    def check(self, source, destination, result_type, expected):
        """Both versions parse to ``result_type`` with ``expected`` endpoints."""
        for version, parse in ((1, parse_v1), (2, parse_v2)):
            result = parse(build(version, source, destination))
            self.assertIsInstance(result, result_type, f"version {version}")
            self.assertEqual(endpoints(result), expected, f"version {version}")

    def test_ipv4(self):
        """IPv4 on both ends is TCP4."""
        self.check(
            v4("203.0.113.7", 40000),
            v4("198.51.100.1", 443),
            ProxyResultIPv4,
            (("203.0.113.7", 40000), ("198.51.100.1", 443)),
        )

    def test_ipv6(self):
        """IPv6 on both ends is TCP6, in canonical form."""
        self.check(
            v6("2001:DB8:0:0::7", 40000),
            v6("2001:db8::1", 443),
            ProxyResultIPv6,
            (("2001:db8::7", 40000), ("2001:db8::1", 443)),
        )
        self.assertEqual(
            build_v1(v6("2001:DB8:0:0::7", 1), v6("2001:db8::1", 2)),
            b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n",
        )

    def test_mapped(self):
        """IPv4-mapped IPv6 on both ends (a dual-stack socket) is TCP4."""
        self.check(
            v6("::ffff:203.0.113.7", 40000),
            v6("::ffff:198.51.100.1", 443),
            ProxyResultIPv4,
            (("203.0.113.7", 40000), ("198.51.100.1", 443)),
        )
        self.assertEqual(
            build_v1(v6("::ffff:203.0.113.7", 40000), v6("::ffff:198.51.100.1", 443)),
            b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n",
        )

    def test_mapped_and_ipv4(self):
        """A mapped address next to a plain IPv4 one is TCP4."""
        self.check(
            v6("::ffff:203.0.113.7", 40000),
            v4("198.51.100.1", 443),
            ProxyResultIPv4,
            (("203.0.113.7", 40000), ("198.51.100.1", 443)),
        )

    def test_mixed(self):
        """IPv4 next to real IPv6 is TCP6 with the IPv4 side mapped."""
        self.check(
            v4("203.0.113.7", 40000),
            v6("2001:db8::1", 443),
            ProxyResultIPv6,
            (("::ffff:cb00:7107", 40000), ("2001:db8::1", 443)),
        )
        self.assertEqual(
            build_v1(v6("2001:db8::1", 443), v4("203.0.113.7", 40000)),
            b"PROXY TCP6 2001:db8::1 ::ffff:203.0.113.7 443 40000\r\n",
        )

    def test_scope_dropped(self):
        """A link-local scope (``%eth0``) is not written."""
        self.check(
            v6("fe80::1%eth0", 40000),
            v6("fe80::2%eth0", 443),
            ProxyResultIPv6,
            (("fe80::1", 40000), ("fe80::2", 443)),
        )
        self.assertNotIn(b"%", build_v1(v6("fe80::1%eth0", 1), v6("fe80::2%2", 2)))

    def test_unknown(self):
        """UNIX addresses, None and UDP addresses are UNKNOWN in both versions."""
        cases = [
            (UNIXAddress(b"/run/a.sock"), UNIXAddress(b"/run/b.sock")),
            (None, None),
            (v4("1.2.3.4", 1), None),
            (None, v6("::1", 1)),
            (IPv4Address("UDP", "1.2.3.4", 1), v4("1.2.3.4", 2)),
        ]
        for source, destination in cases:
            self.assertIsInstance(
                parse_v1(build_v1(source, destination)), ProxyResultUnknown
            )
            header = build_v2(source, destination)
            self.assertIsInstance(parse_v2(header), ProxyResultUnknown)
            self.assertEqual(len(header), 16)


class ErrorTests(SynchronousTestCase):
    """Bad arguments raise ProxyHeaderError naming what was wrong."""

    def test_bad_version(self):
        """Versions other than 1 and 2 are refused."""
        for version in (0, 3, True, "1"):
            with self.assertRaises(ProxyHeaderError) as caught:
                build(version, v4("1.2.3.4", 1), v4("1.2.3.4", 2))
            self.assertIn("version", str(caught.exception))

    def test_bad_host(self):
        """A TCP address whose host is not an IP address is refused."""
        with self.assertRaises(ProxyHeaderError) as caught:
            build_v1(v4("example.com", 1), v4("1.2.3.4", 2))
        self.assertIn("source host", str(caught.exception))

    def test_bad_port(self):
        """A port outside 0..65535 is refused, naming the end."""
        with self.assertRaises(ProxyHeaderError) as caught:
            build_v2(v4("1.2.3.4", 1), v4("1.2.3.4", 65536))
        self.assertIn("destination port", str(caught.exception))

    def test_error_is_value_error(self):
        """ProxyHeaderError is a ValueError, for callers that catch that."""
        self.assertRaises(ValueError, build, 7, None, None)


ports = st.integers(0, 65535)
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)


def twisted_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int):
    if ip.version == 4:
        return v4(str(ip), port)
    return v6(str(ip), port)


def expected_ip(ip, other) -> str:
    """What an ip reads back as, given the other end's ip."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if other.version == 6 and other.ipv4_mapped is not None:
        other = other.ipv4_mapped
    if ip.version == 4 and other.version == 6:
        return str(ipaddress.IPv6Address("::ffff:" + str(ip)))
    return str(ip)


class PropertyTests(SynchronousTestCase):
    """Any pair of addresses round-trips through the independent parser."""

    @given(src=ipv4s | ipv6s, dst=ipv4s | ipv6s, sport=ports, dport=ports)
    def test_round_trip(self, src, dst, sport, dport):
        """Both versions give back the same addresses and ports."""
        source, destination = twisted_address(src, sport), twisted_address(dst, dport)
        want = (
            (expected_ip(src, dst), sport),
            (expected_ip(dst, src), dport),
        )
        for version, parse in ((1, parse_v1), (2, parse_v2)):
            header = build(version, source, destination)
            result = parse(header)
            self.assertIsInstance(result, ProxyResultIPv4 | ProxyResultIPv6)
            self.assertEqual(endpoints(result), want)
        v1 = build_v1(source, destination)
        self.assertLessEqual(len(v1), 107)
        self.assertEqual(v1.count(b"\r\n"), 1)
        v2 = build_v2(source, destination)
        (length,) = struct.unpack("!H", v2[14:16])
        self.assertEqual(length, len(v2) - 16)
