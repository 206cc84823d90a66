"""Tests for threshold.wire.handshake: the hello, reply and stream header lines."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.wire.handshake import (
    MAX_LINE,
    HandshakeError,
    Hello,
    HelloReply,
    LineBuffer,
    StreamHeader,
    encode_hello,
    encode_hello_reply,
    encode_stream_header,
    parse_hello,
    parse_hello_reply,
    parse_stream_header,
)

client_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
    min_size=1,
    max_size=128,
)
service_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co")),
    min_size=1,
    max_size=128,
).filter(str.isprintable)


def split_points(data: bytes):
    """A strategy for a list of sorted cut positions inside ``data``."""
    return st.lists(st.integers(0, len(data)), max_size=20).map(sorted)


def fragments(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def feed_all(buffer: LineBuffer, pieces: list[bytes]) -> tuple[bytes | None, bytes]:
    """Feed pieces until a line comes out; return it and everything after."""
    for i, piece in enumerate(pieces):
        line, rest = buffer.feed(piece)
        if line is not None:
            return line, rest + b"".join(pieces[i + 1 :])
    return None, b""


class LineBufferTests(SynchronousTestCase):
    def test_incomplete(self):
        """Bytes without a newline give no line yet."""
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(b'{"a":'), (None, b""))
        self.assertEqual(buffer.feed(b""), (None, b""))
        self.assertEqual(buffer.feed(b" 1}"), (None, b""))
        self.assertEqual(buffer.feed(b"\nafter"), (b'{"a": 1}', b"after"))

    def test_rest_kept(self):
        """Bytes after the newline, even more newlines, come back untouched."""
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(b"one\ntwo\nthree"), (b"one", b"two\nthree"))

    def test_reusable(self):
        """After a line the buffer starts a new one."""
        buffer = LineBuffer()
        buffer.feed(b"first\n")
        self.assertEqual(buffer.feed(b"sec"), (None, b""))
        self.assertEqual(buffer.feed(b"ond\n"), (b"second", b""))

    def test_exact_limit(self):
        """A line of exactly max_length bytes is accepted."""
        buffer = LineBuffer(10)
        self.assertEqual(buffer.feed(b"x" * 10), (None, b""))
        self.assertEqual(buffer.feed(b"\n"), (b"x" * 10, b""))

    def test_too_long_without_newline(self):
        """More than max_length bytes without a newline is an error."""
        buffer = LineBuffer(10)
        buffer.feed(b"x" * 6)
        with self.assertRaises(HandshakeError) as cm:
            buffer.feed(b"x" * 5)
        self.assertIn("10 bytes", str(cm.exception))

    def test_too_long_with_newline(self):
        """A too-long line that arrives with its newline is an error too."""
        buffer = LineBuffer(10)
        buffer.feed(b"x" * 6)
        self.assertRaises(HandshakeError, buffer.feed, b"x" * 5 + b"\nrest")

    def test_default_limit(self):
        """The default limit is MAX_LINE (4 KiB)."""
        self.assertEqual(MAX_LINE, 4096)
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(b"x" * MAX_LINE), (None, b""))
        self.assertRaises(HandshakeError, buffer.feed, b"x")

    @given(
        st.binary(max_size=200).filter(lambda b: b"\n" not in b),
        st.binary(max_size=200),
        st.data(),
    )
    def test_any_fragmentation(self, line, rest, data):
        """However the stream is cut, the same line and rest come out."""
        stream = line + b"\n" + rest
        pieces = fragments(stream, data.draw(split_points(stream)))
        self.assertEqual(feed_all(LineBuffer(), pieces), (line, rest))

    @given(st.binary(max_size=300), st.data())
    def test_garbage_bounded(self, stream, data):
        """Random bytes give their first line, or an error exactly when too long."""
        pieces = fragments(stream, data.draw(split_points(stream)))
        newline = stream.find(b"\n")
        first_line_length = newline if newline >= 0 else len(stream)
        if first_line_length > 64:
            self.assertRaises(HandshakeError, feed_all, LineBuffer(64), pieces)
            return
        line, rest = feed_all(LineBuffer(64), pieces)
        if newline < 0:
            self.assertEqual((line, rest), (None, b""))
        else:
            self.assertEqual((line, rest), (stream[:newline], stream[newline + 1 :]))


class HelloTests(SynchronousTestCase):
    def test_encode(self):
        """A hello is one JSON line with version 1 and the clientId."""
        data = encode_hello("TestClient1")
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual(data.count(b"\n"), 1)
        self.assertEqual(json.loads(data), {"version": 1, "clientId": "TestClient1"})

    def test_parse(self):
        """A hello parses with or without its newline; unknown keys ignored."""
        expected = Hello(version=1, client_id="abc")
        self.assertEqual(parse_hello(b'{"version": 1, "clientId": "abc"}'), expected)
        self.assertEqual(
            parse_hello(b'{"clientId":"abc","version":1,"extra":[1]}\n'), expected
        )

    @given(client_ids)
    def test_round_trip(self, client_id):
        """Any valid client id survives encode and parse."""
        self.assertEqual(parse_hello(encode_hello(client_id)), Hello(1, client_id))

    def test_encode_refuses_bad_id(self):
        """encode_hello refuses ids a server would refuse."""
        for bad in ("", "a@b", "a b", "x" * 129, "é"):
            self.assertRaises(HandshakeError, encode_hello, bad)

    def assertRefused(self, line: bytes, *words: str) -> None:
        with self.assertRaises(HandshakeError) as cm:
            parse_hello(line)
        message = str(cm.exception)
        for word in words:
            self.assertIn(word, message)
        self.assertNotIn("\n", message)

    def test_not_utf8(self):
        """Bytes that are not UTF-8 are refused."""
        self.assertRefused(b'{"version":1,"clientId":"\xff"}', "UTF-8")

    def test_errors_name_the_field(self):
        """Each refusal names the hello's field and shows the value briefly."""
        self.assertRefused(
            b'{"version": 1, "clientId": "a@b"}',
            'hello field "clientId": expected 1 to 128 letters',
            'got "a@b"',
        )
        self.assertRefused(b'{"clientId": "a"}', 'hello field "version": required')
        self.assertRefused(
            b'{"version": true, "clientId": "a"}', '"version"', "got true"
        )
        self.assertRefused(
            b'{"version": 2, "clientId": "a"}', "unsupported hello version 2"
        )
        long_id = b'{"version": 1, "clientId": "' + b"\\n" * 1000 + b'"}'
        with self.assertRaises(HandshakeError) as cm:
            parse_hello(long_id)
        self.assertLess(len(str(cm.exception)), 200)

    def test_not_json(self):
        """Text that is not JSON is refused."""
        self.assertRefused(b"hello there", "not valid JSON")
        self.assertRefused(b"", "not valid JSON")
        self.assertRefused(b'{"version": NaN}', "not valid JSON")

    def test_not_object(self):
        """A JSON value that is not an object is refused."""
        self.assertRefused(b"[1, 2]", "JSON object", "list")
        self.assertRefused(b'"x"', "JSON object")

    def test_missing_client_id(self):
        """A hello without clientId is refused."""
        self.assertRefused(b'{"version": 1}', "clientId")

    def test_wrong_client_id(self):
        """A clientId that is not a valid id string is refused."""
        for value in ("1", "null", '""', '"a@b"', '["a"]', '"' + "x" * 129 + '"'):
            self.assertRefused(
                b'{"version": 1, "clientId": ' + value.encode() + b"}", "clientId"
            )

    def test_version(self):
        """Only version 1 is accepted; missing or mistyped versions are refused."""
        self.assertRefused(b'{"version": 2, "clientId": "a"}', "unsupported", "2")
        self.assertRefused(b'{"clientId": "a"}', "version")
        self.assertRefused(b'{"version": true, "clientId": "a"}', "version")
        self.assertRefused(b'{"version": 1.0, "clientId": "a"}', "version")
        self.assertRefused(b'{"version": "1", "clientId": "a"}', "version")

    def test_duplicate_keys(self):
        """A hello naming a key twice is refused rather than guessed at."""
        self.assertRefused(
            b'{"version": 1, "clientId": "a", "clientId": "b"}', "more than once"
        )

    def test_too_long(self):
        """A line over MAX_LINE is refused even without LineBuffer."""
        padding = b" " * MAX_LINE
        self.assertRefused(b'{"version": 1, "clientId": "a"}' + padding, "longer")

    def test_deep_nesting(self):
        """Deeply nested JSON is refused, not a crash."""
        self.assertRefused(b"[" * 4000 + b"]" * 4000)


class HelloReplyTests(SynchronousTestCase):
    def test_ok(self):
        """An accepting reply is {"ok": true}."""
        data = encode_hello_reply(True)
        self.assertEqual(json.loads(data), {"ok": True})
        self.assertEqual(parse_hello_reply(data), HelloReply(True, None))

    def test_refused(self):
        """A refusal carries the reason."""
        data = encode_hello_reply(False, "certificate CN does not match")
        self.assertEqual(
            json.loads(data), {"ok": False, "error": "certificate CN does not match"}
        )
        self.assertEqual(
            parse_hello_reply(data), HelloReply(False, "certificate CN does not match")
        )

    @given(st.text(max_size=5000))
    def test_long_error_fits(self, error):
        """Any error text gives one line within MAX_LINE that parses back."""
        data = encode_hello_reply(False, error)
        self.assertLessEqual(len(data), MAX_LINE + 1)
        self.assertEqual(data.count(b"\n"), 1)
        reply = parse_hello_reply(data)
        self.assertFalse(reply.ok)
        self.assertIsInstance(reply.error, str)
        if len(error) <= 200 and error.isprintable():
            self.assertEqual(reply.error, error)

    def test_bad_arguments(self):
        """encode_hello_reply refuses contradictory or mistyped arguments."""
        self.assertRaises(HandshakeError, encode_hello_reply, True, "why")
        self.assertRaises(HandshakeError, encode_hello_reply, 1)
        self.assertRaises(HandshakeError, encode_hello_reply, False, 3)

    def test_parse_errors(self):
        """Replies without a boolean ok or with a mistyped error are refused."""
        for line in (
            b"{}",
            b'{"ok": 1}',
            b'{"ok": "true"}',
            b'{"ok": false, "error": 5}',
        ):
            self.assertRaises(HandshakeError, parse_hello_reply, line)

    def test_unknown_keys(self):
        """Unknown keys in a reply are ignored."""
        self.assertEqual(
            parse_hello_reply(b'{"ok": true, "server": "x"}'), HelloReply(True)
        )


class StreamHeaderTests(SynchronousTestCase):
    def test_encode(self):
        """A stream header is one JSON line naming the service."""
        data = encode_stream_header("fooService")
        self.assertEqual(json.loads(data), {"service": "fooService"})
        self.assertEqual(data.count(b"\n"), 1)

    @given(service_names)
    def test_round_trip(self, service):
        """Any valid service name survives encode and parse."""
        self.assertEqual(
            parse_stream_header(encode_stream_header(service)), StreamHeader(service)
        )

    def test_unknown_keys(self):
        """Unknown keys are ignored (they may be added later)."""
        self.assertEqual(
            parse_stream_header(b'{"service": "web", "future": {"x": 1}}'),
            StreamHeader("web"),
        )

    def test_errors(self):
        """A header without a usable service is refused with a reason."""
        for line in (
            b"{}",
            b'{"service": ""}',
            b'{"service": 5}',
            b'{"service": "a\\nb"}',
            b'{"service": "' + b"s" * 129 + b'"}',
            b"[]",
            b"\xfe",
        ):
            with self.assertRaises(HandshakeError) as cm:
                parse_stream_header(line)
            self.assertIn("stream header", str(cm.exception))

    def test_encode_refuses_bad_service(self):
        """encode_stream_header refuses names the client could not have."""
        for bad in ("", "a\nb", "x" * 129):
            self.assertRaises(HandshakeError, encode_stream_header, bad)

    @given(service_names, st.binary(max_size=100), st.data())
    def test_fragmented_stream(self, service, payload, data):
        """Header then payload, cut anywhere: the header parses, payload intact."""
        stream = encode_stream_header(service) + payload
        pieces = fragments(stream, data.draw(split_points(stream)))
        line, rest = feed_all(LineBuffer(), pieces)
        self.assertEqual(parse_stream_header(line), StreamHeader(service))
        self.assertEqual(rest, payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["version", "clientId", "ok", "error", "service", "x"])
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=10,
)


class GarbageTests(SynchronousTestCase):
    parsers = (parse_hello, parse_hello_reply, parse_stream_header)

    def check(self, line: bytes) -> None:
        for parse in self.parsers:
            try:
                parse(line)
            except HandshakeError as e:
                self.assertTrue(str(e))

    @settings(max_examples=300)
    @given(st.binary(max_size=200))
    def test_random_bytes(self, line):
        """Random bytes either parse or raise HandshakeError, nothing else."""
        self.check(line)

    @settings(max_examples=300)
    @given(json_values)
    def test_random_json(self, value):
        """Random JSON values either parse or raise HandshakeError."""
        self.check(json.dumps(value).encode())

    @given(
        st.sampled_from(
            [
                encode_hello("abc"),
                encode_hello_reply(False, "x"),
                encode_stream_header("s"),
            ]
        ),
        st.data(),
    )
    def test_mutated_lines(self, line, data):
        """Valid lines with bytes flipped, cut or added raise only HandshakeError."""
        mutated = bytearray(line)
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(mutated)))
            action = data.draw(st.sampled_from(["flip", "cut", "add"]))
            if action == "flip" and pos < len(mutated):
                mutated[pos] ^= data.draw(st.integers(1, 255))
            elif action == "cut":
                del mutated[pos : pos + data.draw(st.integers(1, 5))]
            else:
                mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=5))
        self.check(bytes(mutated))
