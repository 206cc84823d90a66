"""The UDP flow's wire: datagram framing, PROXY v2 DGRAM header, stream header."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from proxyprotocol.v2 import ProxyProtocolV2
from twisted.trial.unittest import SynchronousTestCase

from threshold.schema import SERVICE_NAME, Schema, SchemaError, field
from threshold.wire import datagram
from threshold.wire.handshake import (
    PROTO_UDP,
    HandshakeError,
    decode_line,
    encode_stream_header,
    parse_stream_header,
)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for point in [*points, len(data)]:
        out.append(data[last:point])
        last = point
    return out


class FramingTests(SynchronousTestCase):
    @given(
        st.lists(st.binary(max_size=300), max_size=30),
        st.lists(st.integers(min_value=0), max_size=40),
    )
    def test_datagrams_come_back_whole_whatever_the_chunking(self, grams, cuts):
        """Never merged nor split: the same datagrams, in order, empty ones too."""
        stream = b"".join(datagram.encode(g) for g in grams)
        decoder = datagram.DatagramDecoder()
        out = []
        for piece in chunks(stream, cuts):
            out.extend(decoder.feed(piece))
        self.assertEqual(out, grams)
        self.assertEqual(decoder.pending, 0)

    def test_prefix_is_two_bytes_big_endian(self):
        self.assertEqual(datagram.encode(b"abc"), b"\x00\x03abc")
        self.assertEqual(datagram.encode(b""), b"\x00\x00")
        self.assertEqual(len(datagram.encode(b"x" * 65535)), 65537)

    def test_over_the_prefix_is_refused(self):
        with self.assertRaises(datagram.FramingError):
            datagram.encode(b"x" * 65536)

    def test_length_over_the_limit_is_an_error_that_sticks(self):
        """A length past max_size: FramingError, and nothing more is accepted."""
        decoder = datagram.DatagramDecoder(max_size=10)
        self.assertEqual(decoder.feed(datagram.encode(b"0123456789")), [b"0123456789"])
        with self.assertRaises(datagram.FramingError) as caught:
            decoder.feed(b"\x00\x0b" + b"x" * 11)
        self.assertIn("11 bytes", str(caught.exception))
        with self.assertRaises(datagram.FramingError):
            decoder.feed(datagram.encode(b"ok"))

    def test_pending_holds_at_most_one_datagram(self):
        decoder = datagram.DatagramDecoder()
        self.assertEqual(decoder.feed(b"\x00\x05ab"), [])
        self.assertEqual(decoder.pending, 4)
        self.assertEqual(decoder.feed(b"cde\x00"), [b"abcde"])
        self.assertEqual(decoder.pending, 1)

    def test_bad_max_size(self):
        with self.assertRaises(ValueError):
            datagram.DatagramDecoder(max_size=65536)


class ProxyHeaderTests(SynchronousTestCase):
    """The header as the independent proxy-protocol package reads it."""

    def parse(self, source, destination):
        header = datagram.build_proxy_v2_dgram(source, destination)
        self.assertIsNone(datagram.check_proxy_v2(header))
        result = ProxyProtocolV2().unpack(header)
        self.assertEqual(result.protocol, socket.SOCK_DGRAM)
        return (str(result.source[0]), result.source[1]), (
            str(result.dest[0]),
            result.dest[1],
        )

    def test_udp4(self):
        self.assertEqual(
            self.parse(("192.0.2.7", 5353), ("198.51.100.1", 53)),
            (("192.0.2.7", 5353), ("198.51.100.1", 53)),
        )

    def test_udp6(self):
        self.assertEqual(
            self.parse(("2001:db8::7", 51820), ("2001:db8::1", 51820)),
            (("2001:db8::7", 51820), ("2001:db8::1", 51820)),
        )

    def test_ipv4_mapped_is_written_as_ipv4(self):
        self.assertEqual(
            self.parse(("::ffff:192.0.2.7", 1), ("::ffff:192.0.2.1", 2)),
            (("192.0.2.7", 1), ("192.0.2.1", 2)),
        )

    def test_mixed_families_are_written_as_ipv6(self):
        (src, _), (dst, _) = self.parse(("192.0.2.7", 1), ("::", 2))
        self.assertEqual(
            ipaddress.IPv6Address(src).ipv4_mapped, ipaddress.ip_address("192.0.2.7")
        )
        self.assertEqual(dst, "::")

    def test_check_refuses_what_is_not_one_header(self):
        good = datagram.build_proxy_v2_dgram(("192.0.2.7", 1), ("192.0.2.1", 2))
        self.assertIn("not a PROXY", datagram.check_proxy_v2(b"PROXY TCP4 ..."))
        self.assertIn("does not match", datagram.check_proxy_v2(good + b"x"))
        self.assertIn("over", datagram.check_proxy_v2(good + b"x" * 600))


@dataclass(frozen=True)
class _OldStreamHeader:
    """The stream header as clients from before UDP read it."""

    service: str = field("service", SERVICE_NAME, doc="")


class StreamHeaderTests(SynchronousTestCase):
    def test_tcp_header_is_unchanged(self):
        """TCP streams start exactly as before (older clients keep working)."""
        self.assertEqual(encode_stream_header("web"), b'{"service":"web"}\n')
        header = parse_stream_header(b'{"service":"web"}')
        self.assertEqual((header.service, header.proto), ("web", "tcp"))

    def test_udp_header_round_trip(self):
        line = encode_stream_header("dns", PROTO_UDP, proxy_v2=True)
        self.assertEqual(line, b'{"proto":"udp","udpService":"dns","proxyV2":true}\n')
        header = parse_stream_header(line)
        self.assertEqual(
            (header.service, header.proto, header.proxy_v2), ("dns", "udp", True)
        )

    def test_an_older_client_refuses_a_udp_flow(self):
        """A client that ignores "proto" finds no "service": it resets the stream."""
        old = Schema(_OldStreamHeader, ignore_unknown=True)
        line = encode_stream_header("dns", PROTO_UDP)
        with self.assertRaises(SchemaError) as caught:
            old.parse(decode_line(line, "stream header"))
        self.assertIn("service", str(caught.exception))

    def test_unknown_proto_refused(self):
        for line in (
            b'{"service":"x","proto":"quic"}',
            b'{"service":"x","proto":5}',
            b'{"proto":"udp","service":"x"}',
            b'{"proto":"udp","udpService":"bad name\\u0000"}',
        ):
            with self.assertRaises(HandshakeError):
                parse_stream_header(line)

    def test_encode_refuses_unknown_proto(self):
        with self.assertRaises(HandshakeError):
            encode_stream_header("dns", "sctp")
