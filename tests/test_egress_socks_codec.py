"""The SOCKS5 parser: every split of valid input, every malformed input."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.client.socks_codec import (
    Connect,
    Fail,
    Reply,
    Send,
    SocksParser,
    SocksState,
    encode_reply,
)

GREETING = b"\x05\x01\x00"
METHOD_OK = Send(b"\x05\x00")


def request(atyp: int, address: bytes, port: int = 25, cmd: int = 1) -> bytes:
    return bytes([5, cmd, 0, atyp]) + address + port.to_bytes(2, "big")


def domain(name: bytes, port: int = 25) -> bytes:
    return request(3, bytes([len(name)]) + name, port)


def feed_all(data: bytes, cuts: list[int] = ()) -> list:
    """Feed ``data`` cut at ``cuts``; the events of every piece together."""
    parser = SocksParser()
    events = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        if parser.state in (SocksState.DONE, SocksState.FAILED):
            break
        events.extend(parser.feed(data[start:cut]))
        start = cut
    return events


class ValidTests(SynchronousTestCase):
    def test_ipv4(self):
        """Greeting then an IPv4 CONNECT: method chosen, then the target."""
        events = feed_all(GREETING + request(1, socket.inet_aton("192.0.2.7"), 587))
        self.assertEqual(events, [METHOD_OK, Connect("192.0.2.7", 587, b"")])

    def test_ipv6_and_mapped(self):
        """IPv6 written in its short form; IPv4-mapped read as IPv4."""
        raw = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
        self.assertEqual(
            feed_all(GREETING + request(4, raw))[-1], Connect("2001:db8::1", 25)
        )
        mapped = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
        self.assertEqual(
            feed_all(GREETING + request(4, mapped))[-1], Connect("127.0.0.1", 25)
        )

    def test_domain(self):
        """A name is passed on lower-cased, without its final dot."""
        events = feed_all(GREETING + domain(b"SMTP.Example.NET."))
        self.assertEqual(events[-1], Connect("smtp.example.net", 25))
        self.assertEqual(feed_all(GREETING + domain(b"::1"))[-1], Connect("::1", 25))

    def test_bytes_after_the_request(self):
        """What follows the request (pipelined data) is handed over."""
        events = feed_all(GREETING + domain(b"a.example") + b"EHLO x\r\n")
        self.assertEqual(events[-1], Connect("a.example", 25, b"EHLO x\r\n"))

    def test_several_methods(self):
        """Offering user/password and no-auth: no-auth is chosen."""
        events = feed_all(b"\x05\x03\x02\x01\x00" + domain(b"a.example"))
        self.assertEqual(events[0], METHOD_OK)

    @given(st.lists(st.integers(0, 40), max_size=10))
    def test_any_fragmentation(self, cuts):
        """Cut anywhere: the same events; the bytes after the request are the
        Connect's ``rest`` and the pieces after it, in order."""
        data = GREETING + domain(b"mail.example.org", 465) + b"payload"
        parser = SocksParser()
        events, after = [], b""
        start = 0
        for cut in sorted(set(cuts)) + [len(data)]:
            piece, start = data[start:cut], max(start, cut)
            if parser.state is SocksState.DONE:
                after += piece
            elif piece:
                events.extend(parser.feed(piece))
        self.assertEqual(events[0], METHOD_OK)
        connect = events[-1]
        self.assertEqual((connect.host, connect.port), ("mail.example.org", 465))
        self.assertEqual(connect.rest + after, b"payload")

    def test_byte_by_byte(self):
        """One byte at a time."""
        parser = SocksParser()
        events = []
        for byte in GREETING + domain(b"a.example"):
            events.extend(parser.feed(bytes([byte])))
        self.assertEqual(events, [METHOD_OK, Connect("a.example", 25)])
        self.assertIs(parser.state, SocksState.DONE)


class MalformedTests(SynchronousTestCase):
    def outcome(self, data: bytes) -> Fail:
        events = feed_all(data)
        self.assertIsInstance(events[-1], Fail, events)
        return events[-1]

    def test_not_socks5(self):
        """SOCKS4, HTTP or TLS: closed with no reply (none they would read)."""
        for data in (b"\x04\x01\x00\x19", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01"):
            self.assertEqual(self.outcome(data).reply, None)

    def test_no_method(self):
        """A greeting with no method at all."""
        self.assertIsNone(self.outcome(b"\x05\x00").reply)

    def test_no_acceptable_method(self):
        """Only user/password offered: 05 FF, then closed."""
        events = feed_all(b"\x05\x01\x02")
        self.assertEqual(events[0], Send(b"\x05\xff"))
        self.assertIsInstance(events[1], Fail)

    def test_commands(self):
        """BIND and UDP ASSOCIATE: command not supported."""
        for cmd in (2, 3, 9):
            data = GREETING + request(1, b"\x7f\x00\x00\x01", cmd=cmd)
            self.assertEqual(self.outcome(data).reply, Reply.COMMAND_NOT_SUPPORTED)

    def test_address_type(self):
        """An unknown address type: address type not supported."""
        data = GREETING + request(5, b"\x00" * 4)
        self.assertEqual(self.outcome(data).reply, Reply.ADDRESS_TYPE_NOT_SUPPORTED)

    def test_bad_request_fields(self):
        """Wrong version, reserved byte, name or port 0: general failure."""
        cases = [
            GREETING + b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x19",
            GREETING + b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x19",
            GREETING + domain(b""),
            GREETING + domain(b"bad name!"),
            GREETING + domain(b"\xff\xfe"),
            GREETING + domain(b"a" * 64 + b".example"),
            GREETING + request(1, b"\x7f\x00\x00\x01", port=0),
        ]
        for data in cases:
            self.assertEqual(self.outcome(data).reply, Reply.GENERAL_FAILURE, data)

    def test_fed_after_the_end(self):
        """A parser that is done is not fed again (a bug in the caller)."""
        parser = SocksParser()
        parser.feed(b"\x04")
        self.assertRaises(AssertionError, parser.feed, b"x")

    @given(st.binary(max_size=300))
    def test_random_input(self, data):
        """Random bytes never raise; at most one Connect or Fail, last."""
        events = feed_all(data)
        ends = [e for e in events if isinstance(e, Connect | Fail)]
        self.assertLessEqual(len(ends), 1)
        if ends:
            self.assertIs(events[-1], ends[0])


class ReplyTests(SynchronousTestCase):
    def test_replies(self):
        """A reply carries the code and the bound address (IPv4 or IPv6)."""
        self.assertEqual(
            encode_reply(Reply.SUCCEEDED, "203.0.113.7", 40312),
            b"\x05\x00\x00\x01\xcb\x00\x71\x07" + (40312).to_bytes(2, "big"),
        )
        six = encode_reply(Reply.SUCCEEDED, "2001:db8::2", 1)
        self.assertEqual(six[:4], b"\x05\x00\x00\x04")
        self.assertEqual(len(six), 4 + 16 + 2)
        self.assertEqual(
            encode_reply(Reply.NOT_ALLOWED), b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
        )
