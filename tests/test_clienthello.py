"""Tests for threshold.clienthello, with real hellos from Python and openssl."""

from __future__ import annotations

import functools
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.components import missing
from tests.tlshello import python_hello
from threshold.wire.clienthello import (
    DEFAULT_MAX_RECORDS,
    DEFAULT_MAX_SIZE,
    ClientHelloParser,
    Hello,
    NeedMore,
    NotTls,
    parse_client_hello,
)

OPENSSL = shutil.which("openssl")
GREASE = [0x0A0A + 0x1010 * i for i in range(16)]


# Building hellos -----------------------------------------------------------


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def vec8(body: bytes) -> bytes:
    return u8(len(body)) + body


def vec16(body: bytes) -> bytes:
    return u16(len(body)) + body


def sni_extension(*entries: tuple[int, bytes]) -> tuple[int, bytes]:
    """A server_name extension holding (name_type, name) entries."""
    return 0, vec16(b"".join(u8(kind) + vec16(name) for kind, name in entries))


def extensions_block(extensions: Iterable[tuple[int, bytes]]) -> bytes:
    return vec16(b"".join(u16(kind) + vec16(body) for kind, body in extensions))


def hello_message(
    extensions: Iterable[tuple[int, bytes]] | None = (),
    *,
    version: bytes = b"\x03\x03",
    session_id: bytes = b"\x01" * 32,
    suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    compression: bytes = b"\x00",
    trailer: bytes = b"",
) -> bytes:
    """A ClientHello handshake message; no extensions block when None."""
    body = version + b"\x5a" * 32 + vec8(session_id) + vec16(suites)
    body += vec8(compression)
    if extensions is not None:
        body += extensions_block(extensions)
    body += trailer
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: Iterable[int] = (), version=b"\x03\x01") -> bytes:
    """Frame a handshake message into handshake records of the given sizes.

    The sizes are used in turn and the last repeats; the default is one
    record per 16384 bytes.
    """
    sizes = list(sizes) or [16384]
    out, pos, i = [], 0, 0
    while pos < len(message):
        size = sizes[min(i, len(sizes) - 1)]
        chunk = message[pos : pos + size]
        out.append(b"\x16" + version + u16(len(chunk)) + chunk)
        pos += size
        i += 1
    return b"".join(out)


def message_of(hello: bytes) -> bytes:
    """Reassemble the handshake message from a well-formed record stream."""
    out, pos = [], 0
    while pos < len(hello):
        length = int.from_bytes(hello[pos + 3 : pos + 5], "big")
        out.append(hello[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return b"".join(out)


def key_share(*shares: tuple[int, int]) -> tuple[int, bytes]:
    """A key_share extension with (group, key length) shares."""
    body = b"".join(u16(group) + vec16(b"\x42" * size) for group, size in shares)
    return 0x0033, vec16(body)


# Real hellos ---------------------------------------------------------------


@functools.cache
def python_hellos() -> dict[str, tuple[bytes, str | None]]:
    """Real hellos and the name each should give, by description."""
    return {
        "tls13": (python_hello("www.example.com"), "www.example.com"),
        "tls12": (
            python_hello("api.example.net", maximum=ssl.TLSVersion.TLSv1_2),
            "api.example.net",
        ),
        "upper": (python_hello("MiXeD.Example.ORG"), "mixed.example.org"),
        "no-sni": (python_hello(None), None),
    }


class RealHelloTests(SynchronousTestCase):
    """Hellos produced by real TLS stacks parse at any fragmentation."""

    def assert_incremental(self, hello: bytes, name: str | None) -> None:
        """Byte by byte: NeedMore until the last byte, then Hello(name)."""
        buffer = bytearray()
        for i, byte in enumerate(hello):
            self.assertEqual(parse_client_hello(buffer), NeedMore(), f"at {i}")
            # Growing the buffer after the call shows no view was kept on it.
            buffer.append(byte)
        self.assertEqual(parse_client_hello(buffer), Hello(name))

    def test_python_hellos(self):
        """Python's TLS 1.3 and 1.2 hellos give their SNI name, lowercased."""
        for label, (hello, name) in python_hellos().items():
            with self.subTest(label):
                self.assertEqual(hello[0], 0x16)
                self.assert_incremental(hello, name)

    def test_python_tls10(self):
        """A TLS 1.0-only hello (record and hello version 3.1) parses."""
        try:
            hello = python_hello(
                "old.example",
                minimum=ssl.TLSVersion.TLSv1,
                maximum=ssl.TLSVersion.TLSv1,
                ciphers="DEFAULT:@SECLEVEL=0",
            )
        except ssl.SSLError as e:
            raise SkipTest(f"this OpenSSL cannot send TLS 1.0: {e}") from None
        if not hello:
            raise SkipTest("this OpenSSL sent no TLS 1.0 hello")
        self.assertEqual(hello[9:11], b"\x03\x01")
        self.assert_incremental(hello, "old.example")

    def test_trailing_bytes_ignored(self):
        """Bytes after the hello (early data, garbage) do not change the answer."""
        hello, name = python_hellos()["tls13"]
        self.assertEqual(parse_client_hello(hello + b"\x17\x03\x03junk"), Hello(name))
        self.assertEqual(parse_client_hello(hello + b"\x00" * 20000), Hello(name))

    def openssl_hello(self, *options: str, skip_refused: bool = False) -> bytes:
        """Capture what ``openssl s_client`` sends to a plain loopback socket.

        With ``skip_refused``, an openssl that exits without connecting (an
        option it does not support) skips the test instead of failing it.
        """
        if OPENSSL is None:
            raise missing("openssl is not installed")
        server = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(server.close)
        server.settimeout(0.05)
        port = server.getsockname()[1]
        process = subprocess.Popen(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def reap():
            if process.poll() is None:
                process.kill()
            process.communicate()

        self.addCleanup(reap)
        deadline = time.monotonic() + 10
        while True:
            try:
                connection, _ = server.accept()
                break
            except TimeoutError:
                if process.poll() is not None:
                    error = process.stderr.read().decode(errors="replace").strip()
                    if skip_refused:
                        raise SkipTest(f"openssl {options}: {error}") from None
                    self.fail(f"openssl {options} did not connect: {error}")
                if time.monotonic() > deadline:
                    self.fail(f"openssl {options} did not connect in time")
        with connection:
            connection.settimeout(10)
            hello = b""
            # Framed here, independently of the parser: one handshake record.
            while len(hello) < 5 or len(hello) < 5 + int.from_bytes(hello[3:5], "big"):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                hello += chunk
        process.communicate(timeout=10)
        return hello

    def test_openssl_tls13(self):
        """An openssl s_client TLS 1.3 hello gives its name, lowercased."""
        hello = self.openssl_hello("-servername", "Shop.Example.COM", "-tls1_3")
        self.assert_incremental(hello, "shop.example.com")

    def test_openssl_tls12(self):
        """An openssl s_client TLS 1.2-only hello gives its name."""
        hello = self.openssl_hello("-servername", "legacy.example.com", "-tls1_2")
        self.assert_incremental(hello, "legacy.example.com")

    def test_openssl_no_sni(self):
        """An openssl s_client hello without SNI gives Hello(None)."""
        hello = self.openssl_hello("-noservername")
        self.assert_incremental(hello, None)

    def test_openssl_large_classic_share(self):
        """A 1 KiB ffdhe8192 key share (a 1.2 KB hello) parses."""
        hello = self.openssl_hello(
            "-servername",
            "big.example",
            "-tls1_3",
            "-groups",
            "ffdhe8192",
            skip_refused=True,
        )
        self.assertGreater(len(hello), 1200)
        self.assert_incremental(hello, "big.example")

    def test_openssl_post_quantum_share(self):
        """An X25519MLKEM768 hybrid key share (1216 bytes) parses."""
        hello = self.openssl_hello(
            "-servername",
            "pq.example",
            "-groups",
            "X25519MLKEM768:X25519",
            skip_refused=True,
        )
        self.assertGreater(len(hello), 1200)
        self.assert_incremental(hello, "pq.example")

    def test_hand_built_post_quantum_share(self):
        """A hello with GREASE, hybrid and X25519 key shares parses."""
        message = hello_message(
            [
                (GREASE[3], b""),
                sni_extension((0, b"pq.example")),
                key_share((GREASE[5], 1), (0x11EC, 1216), (0x001D, 32)),
                (GREASE[9], b"\x00"),
            ]
        )
        hello = records(message)
        self.assertGreater(len(hello), 1300)
        self.assert_incremental(hello, "pq.example")


class RecordTests(SynchronousTestCase):
    """The handshake message is reassembled from consecutive records."""

    @settings(max_examples=200, deadline=None)
    @given(
        label=st.sampled_from(sorted(python_hellos())),
        sizes=st.lists(st.integers(1, 600), min_size=1, max_size=20),
        record_version=st.sampled_from([b"\x03\x00", b"\x03\x01", b"\x03\x03"]),
        cut=st.integers(0, 10**6),
    )
    def test_reframed(self, label, sizes, record_version, cut):
        """A real hello re-framed into records of any sizes still parses."""
        hello, name = python_hellos()[label]
        framed = records(message_of(hello), sizes, record_version)
        self.assertEqual(parse_client_hello(framed), Hello(name))
        cut %= len(framed)
        self.assertEqual(parse_client_hello(framed[:cut]), NeedMore())

    def test_one_byte_records(self):
        """One byte per record, the handshake header spanning four records."""
        hello, name = python_hellos()["tls12"]
        framed = records(message_of(hello), [1])
        self.assertEqual(len(framed), 6 * len(message_of(hello)))
        self.assertEqual(parse_client_hello(framed), Hello(name))
        for cut in range(0, len(framed), 7):
            self.assertEqual(parse_client_hello(framed[:cut]), NeedMore())

    def test_message_ends_inside_record(self):
        """The answer comes when the message ends, not the record around it."""
        message = hello_message([sni_extension((0, b"a.example"))])
        hello = b"\x16\x03\x01" + u16(len(message) + 10) + message
        self.assertEqual(parse_client_hello(hello), Hello("a.example"))

    def test_other_record_type_between(self):
        """A non-handshake record before the message is complete is NotTls."""
        message = hello_message([sni_extension((0, b"a.example"))])
        hello = (
            records(message[:10]) + b"\x14\x03\x03\x00\x01\x01" + records(message[10:])
        )
        result = parse_client_hello(hello)
        self.assertIsInstance(result, NotTls)
        self.assertIn("record type 0x14", result.reason)


class NameTests(SynchronousTestCase):
    """The SNI host name is normalised and validated."""

    def name_of(self, *entries: tuple[int, bytes]) -> str | None:
        hello = records(hello_message([sni_extension(*entries)]))
        result = parse_client_hello(hello)
        self.assertIsInstance(result, Hello)
        return result.server_name

    def test_lowercase_and_trailing_dot(self):
        """Names are lowercased and lose one trailing dot."""
        self.assertEqual(self.name_of((0, b"WWW.Example.COM.")), "www.example.com")

    def test_a_label(self):
        """A valid IDNA A-label is kept as it is (lowercased)."""
        self.assertEqual(
            self.name_of((0, b"XN--bcher-kva.example")), "xn--bcher-kva.example"
        )

    def test_invalid_names(self):
        """A name that is not a DNS host name counts as no SNI."""
        invalid = [
            b"under_score.example",
            b"-leading.example",
            b"trailing-.example",
            b"double..dot",
            b".",
            b"..",
            b"a" * 64 + b".example",
            b".".join([b"a" * 63] * 4),
            b"192.0.2.1",
            b"[2001:db8::1]",
            b"caf\xc3\xa9.example",
            b"nul\x00.example",
            b"space .example",
            b"xn--.example",
            b"xn--abc.example",
            b"xn--zz-.example",
        ]
        for name in invalid:
            with self.subTest(name):
                self.assertIsNone(self.name_of((0, name)))

    def test_longest_valid_name(self):
        """A 253-byte name of 63-byte labels is valid."""
        name = b".".join([b"a" * 63] * 3 + [b"b" * 61])
        self.assertEqual(len(name), 253)
        self.assertEqual(self.name_of((0, name)), name.decode())

    def test_other_name_types_skipped(self):
        """Entries of unknown name types are skipped; none at all is no SNI."""
        self.assertEqual(self.name_of((7, b"x"), (0, b"b.example")), "b.example")
        self.assertIsNone(self.name_of((7, b"other")))


class NotTlsTests(SynchronousTestCase):
    """Bytes that are not a well-formed ClientHello say precisely why."""

    def assert_not_tls(self, data: bytes, *fragments: str) -> None:
        result = parse_client_hello(data)
        self.assertIsInstance(result, NotTls)
        for fragment in fragments:
            self.assertIn(fragment, result.reason)

    def test_http(self):
        """Plain HTTP is refused from its first byte."""
        self.assert_not_tls(b"G", "record type 0x47", "handshake (0x16)")
        self.assert_not_tls(b"GET / HTTP/1.1\r\n\r\n", "record type 0x47")

    def test_sslv2_hello(self):
        """An SSLv2-compatible hello is refused as such."""
        sslv2 = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + b"\x00" * 37
        self.assert_not_tls(sslv2, "0x80", "SSLv2")

    def test_record_version(self):
        """A record version with major other than 3 is refused."""
        self.assert_not_tls(b"\x16\x02\x00", "record version 2.0")
        self.assert_not_tls(b"\x16\xfe\xfd", "record version 254.253")

    def test_record_lengths(self):
        """Empty records and records over 2^14 bytes are refused."""
        self.assert_not_tls(b"\x16\x03\x01\x00\x00", "empty")
        self.assert_not_tls(b"\x16\x03\x01\x40\x01", "record length 16385")

    def test_handshake_type(self):
        """A handshake message other than ClientHello is refused."""
        self.assert_not_tls(b"\x16\x03\x03\x00\x04\x02\x00\x00\x46", "handshake type 2")
        self.assert_not_tls(
            records(b"\x0b\x00\x00\x00", [1]), "handshake type 11", "ClientHello (1)"
        )

    def test_hello_version(self):
        """A hello whose legacy_version major is not 3 is refused."""
        self.assert_not_tls(
            records(hello_message(version=b"\x02\x00")), "ClientHello version 2.0"
        )

    def test_session_id(self):
        """A session_id over 32 bytes is refused."""
        self.assert_not_tls(
            records(hello_message(session_id=b"\x00" * 33)), "session_id length 33"
        )

    def test_cipher_suites(self):
        """Odd-length or empty cipher_suites are refused."""
        self.assert_not_tls(records(hello_message(suites=b"\x13\x01\x00")), "length 3")
        self.assert_not_tls(records(hello_message(suites=b"")), "cipher_suites")

    def test_compression(self):
        """Empty compression_methods are refused."""
        self.assert_not_tls(
            records(hello_message(compression=b"")), "compression_methods is empty"
        )

    def test_no_extensions(self):
        """A hello without an extensions block is well formed, without SNI."""
        self.assertEqual(
            parse_client_hello(records(hello_message(None, version=b"\x03\x00"))),
            Hello(None),
        )

    def test_bytes_after_extensions(self):
        """Bytes after the extensions block are refused."""
        self.assert_not_tls(
            records(hello_message([], trailer=b"\x00")), "1 bytes follow the extensions"
        )
        self.assert_not_tls(records(hello_message(None, trailer=b"\x00")), "extensions")

    def test_extension_overrun(self):
        """An extension whose length runs past the block is refused."""
        message = bytearray(hello_message([(0x0010, b"h2"), (0x002B, b"\x02\x03\x04")]))
        message[-4] = 0x09  # the supported_versions length: 3 -> 9
        self.assert_not_tls(
            records(bytes(message)), "extension 0x002b length 9", "(3 bytes left)"
        )

    def test_truncated_message(self):
        """A message too short for its fields is refused, naming the field."""
        message = hello_message()[:40]
        message = b"\x01" + (len(message) - 4).to_bytes(3, "big") + message[4:]
        self.assert_not_tls(records(message), "session_id", "ClientHello")

    def test_server_name_errors(self):
        """Malformed server_name extensions are refused."""
        sni = sni_extension((0, b"a.example"))
        cases = [
            ([sni, sni], "duplicate server_name"),
            ([(0, b"")], "server_name_list length"),
            ([(0, b"\x00\x00")], "server_name_list is empty"),
            ([(0, sni[1] + b"\x00")], "1 bytes follow server_name_list"),
            ([sni_extension((0, b"a.example"), (0, b"b.example"))], "more than one"),
            ([sni_extension((0, b""))], "host_name is empty"),
            ([(0, b"\x00\x04\x00\x00\x09a")], "server name of type 0 length 9"),
        ]
        for extensions, fragment in cases:
            with self.subTest(fragment):
                self.assert_not_tls(records(hello_message(extensions)), fragment)


class IncrementalTests(SynchronousTestCase):
    """One parser per connection: fed chunk by chunk, linear work."""

    def one_byte_records(self, size: int) -> bytes:
        """A hello message of ``size`` bytes (SNI a.example), a byte per record."""
        extensions = [sni_extension((0, b"a.example"))]
        padding = size - len(hello_message([*extensions, (0x0015, b"")]))
        message = hello_message([*extensions, (0x0015, b"\x00" * padding)])
        self.assertEqual(len(message), size)
        return records(message, [1])

    def test_one_byte_records_fed_byte_by_byte(self):
        """2,730 one-byte records, a byte per feed: work linear in the bytes.

        Re-parsing the buffer on every feed, as the front end once did, walks
        every record so far each time: about 22 million record steps here.
        """
        data = self.one_byte_records(2730)
        self.assertEqual(len(data), 16380)
        parser = ClientHelloParser(max_size=DEFAULT_MAX_SIZE, max_records=None)
        for i in range(len(data) - 1):
            self.assertEqual(parser.feed(data[i : i + 1]), NeedMore(), f"at {i}")
        self.assertEqual(parser.feed(data[-1:]), Hello("a.example"))
        self.assertEqual(parser.records, 2730)
        # Each byte appended once, one resumed step per feed and per record,
        # the message copied once.
        self.assertLessEqual(parser.work, 3 * len(data))
        self.assertEqual(bytes(parser.buffer), data)

    def test_work_does_not_depend_on_chunking(self):
        """The same bytes cost about the same fed whole or a byte at a time."""
        data = self.one_byte_records(1000)
        whole = ClientHelloParser(max_size=DEFAULT_MAX_SIZE, max_records=None)
        self.assertEqual(whole.feed(data), Hello("a.example"))
        pieces = ClientHelloParser(max_size=DEFAULT_MAX_SIZE, max_records=None)
        for i in range(len(data)):
            pieces.feed(data[i : i + 1])
        self.assertEqual(pieces.result, Hello("a.example"))
        self.assertLessEqual(pieces.work, whole.work + len(data))

    def test_records_bounded(self):
        """More than max_records records: a bounded NotTls, at the record past it."""
        data = self.one_byte_records(300)
        parser = ClientHelloParser(max_records=256)
        result = parser.feed(data)
        self.assertEqual(
            result, NotTls("ClientHello spread over more than 256 records")
        )
        self.assertTrue(result.bounded)
        # Known as soon as record 256 is in, without waiting for more.
        self.assertEqual(parse_client_hello(data[: 6 * 256]), NeedMore())
        self.assertEqual(parse_client_hello(data[: 6 * 256], max_records=256), result)
        # Exactly at the bound it still parses.
        fits = self.one_byte_records(256)
        self.assertEqual(
            ClientHelloParser(max_records=256).feed(fits), Hello("a.example")
        )
        self.assertEqual(DEFAULT_MAX_RECORDS, 256)

    def test_bounded_flag(self):
        """Only a bound sets ``bounded``; it takes no part in equality."""
        hello, _ = python_hellos()["tls13"]
        over = parse_client_hello(hello, len(hello) - 1)
        self.assertTrue(over.bounded)
        bad = parse_client_hello(b"GET / HTTP/1.1\r\n")
        self.assertIsInstance(bad, NotTls)
        self.assertFalse(bad.bounded)
        self.assertEqual(over, NotTls(over.reason))

    def test_answer_kept(self):
        """Once answered, later feeds change nothing and are not buffered."""
        hello, name = python_hellos()["tls12"]
        parser = ClientHelloParser()
        self.assertEqual(parser.feed(hello), Hello(name))
        self.assertEqual(parser.feed(b"\x00" * 100), Hello(name))
        self.assertEqual(bytes(parser.buffer), hello)

    @settings(max_examples=300, deadline=None)
    @given(
        label=st.sampled_from(sorted(python_hellos())),
        sizes=st.lists(st.integers(1, 300), min_size=1, max_size=10),
        chunks=st.lists(st.integers(1, 700), min_size=1, max_size=30),
        max_size=st.integers(0, 3000),
    )
    def test_fed_in_chunks_as_parsed_whole(self, label, sizes, chunks, max_size):
        """Any chunking answers as the pure function does on each prefix."""
        hello, _ = python_hellos()[label]
        framed = records(message_of(hello), sizes)
        parser = ClientHelloParser(max_size)
        pos, i = 0, 0
        while pos < len(framed):
            size = chunks[i % len(chunks)]
            i += 1
            result = parser.feed(framed[pos : pos + size])
            pos += size
            self.assertEqual(result, parse_client_hello(framed[:pos], max_size))
            if result != NeedMore():
                break

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400)))
    def test_random_bytes_in_chunks(self, data, cuts):
        """Random bytes in random chunks never raise and match the whole answer."""
        parser = ClientHelloParser()
        last = 0
        for cut in sorted(set(cuts)) + [len(data)]:
            cut = min(cut, len(data))
            parser.feed(data[last:cut])
            last = cut
        whole = parse_client_hello(data)
        if parser.result != NeedMore():
            self.assertEqual(parser.result, whole)
        else:
            self.assertEqual(whole, NeedMore())


class SizeTests(SynchronousTestCase):
    """The hello may occupy at most max_size bytes, record headers included."""

    def test_exact_fit(self):
        """A hello of exactly max_size bytes parses; one byte less does not."""
        hello, name = python_hellos()["tls13"]
        self.assertEqual(parse_client_hello(hello, len(hello)), Hello(name))
        result = parse_client_hello(hello, len(hello) - 1)
        self.assertEqual(
            result, NotTls(f"ClientHello larger than {len(hello) - 1} bytes")
        )

    def test_declared_length(self):
        """A declared length over the limit is refused from the first 9 bytes."""
        result = parse_client_hello(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff")
        self.assertIsInstance(result, NotTls)
        self.assertIn(f"larger than {DEFAULT_MAX_SIZE} bytes", result.reason)

    def test_record_overhead_counts(self):
        """Tiny records that push a small hello past max_size are refused."""
        message = hello_message([(0x0015, b"\x00" * 3000)])
        framed = records(message, [1])
        self.assertLess(len(message), DEFAULT_MAX_SIZE)
        self.assertGreater(len(framed), DEFAULT_MAX_SIZE)
        for cut in (DEFAULT_MAX_SIZE, len(framed)):
            result = parse_client_hello(framed[:cut])
            self.assertIsInstance(result, NotTls)
            self.assertIn("larger than", result.reason)

    def test_padded_hello_over_default(self):
        """A 17 KB hello over two records is refused with the default limit."""
        message = hello_message([(0x0015, b"\x00" * 17000)])
        self.assertIsInstance(parse_client_hello(records(message)), NotTls)
        self.assertEqual(
            parse_client_hello(records(message), max_size=20000), Hello(None)
        )

    @settings(max_examples=200, deadline=None)
    @given(
        label=st.sampled_from(sorted(python_hellos())),
        max_size=st.integers(0, 1200),
        cut=st.integers(0, 10**6),
    )
    def test_bounded(self, label, max_size, cut):
        """Never NeedMore once max_size bytes are buffered; Hello iff it fits."""
        hello, name = python_hellos()[label]
        prefix = hello[: cut % (len(hello) + 1)]
        result = parse_client_hello(prefix, max_size)
        if len(prefix) >= max_size:
            self.assertNotEqual(result, NeedMore())
        full = parse_client_hello(hello, max_size)
        if len(hello) <= max_size:
            self.assertEqual(full, Hello(name))
        else:
            self.assertIsInstance(full, NotTls)


# Fuzzing -------------------------------------------------------------------


@st.composite
def host_names(draw) -> bytes:
    """Valid host names, in random case, sometimes with a trailing dot."""
    label = st.from_regex(
        r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True
    )
    labels = draw(st.lists(label, min_size=0, max_size=4))
    top = draw(st.from_regex(r"[a-zA-Z]{1,10}", fullmatch=True))
    name = ".".join([*labels, top])
    if draw(st.booleans()):
        name += "."
    return name.encode("ascii")


extension_types = st.sampled_from(GREASE) | st.integers(1, 0xFFFF)
other_extensions = st.lists(
    st.tuples(extension_types, st.binary(max_size=80)), max_size=25
)
suite_lists = st.lists(st.sampled_from(GREASE) | st.integers(0, 0xFFFF), min_size=1)


@st.composite
def mutated_hellos(draw) -> bytes:
    """A real hello with bytes flipped, inserted and deleted."""
    hello = bytearray(draw(st.sampled_from(list(python_hellos().values())))[0])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        index = draw(st.integers(0, len(hello) - 1))
        if op == "flip":
            hello[index] ^= draw(st.integers(1, 255))
        elif op == "insert":
            hello.insert(index, draw(st.integers(0, 255)))
        elif len(hello) > 1:
            del hello[index]
    return bytes(hello)


class FuzzTests(SynchronousTestCase):
    """Nothing raises, and the answer never changes as more bytes arrive."""

    def assert_stable(self, data: bytes, cut: int) -> None:
        """A decided prefix gives the same answer as the whole buffer."""
        whole = parse_client_hello(data)
        self.assertIsInstance(whole, NeedMore | Hello | NotTls)
        prefix = parse_client_hello(data[: cut % (len(data) + 1)])
        if prefix != NeedMore():
            self.assertEqual(prefix, whole)

    @settings(max_examples=500)
    @given(data=st.binary(max_size=300))
    def test_random_bytes(self, data):
        """Random bytes give NotTls or NeedMore."""
        self.assertIsInstance(parse_client_hello(data), NeedMore | NotTls)

    @settings(max_examples=500)
    @given(
        version=st.integers(0, 0xFFFF),
        length=st.integers(0, 0xFFFF),
        rest=st.binary(max_size=400),
        cut=st.integers(0, 10**6),
    )
    def test_random_after_record_header(self, version, length, rest, cut):
        """Random bytes behind a handshake record header never raise."""
        self.assert_stable(b"\x16" + u16(version) + u16(length) + rest, cut)

    @settings(max_examples=500)
    @given(
        version=st.sampled_from([b"\x03\x01", b"\x03\x03"]),
        body=st.binary(max_size=400),
        declared=st.integers(0, 0xFFFFFF) | st.just(None),
        sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5),
        cut=st.integers(0, 10**6),
    )
    def test_random_hello_body(self, version, body, declared, sizes, cut):
        """A random ClientHello body in valid records never raises."""
        length = len(body) if declared is None else declared
        message = b"\x01" + length.to_bytes(3, "big") + body
        self.assert_stable(records(message, sizes, version), cut)

    @settings(
        max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(data=mutated_hellos(), cut=st.integers(0, 10**6))
    def test_mutated_real_hellos(self, data, cut):
        """Real hellos with bytes flipped, inserted or deleted never raise."""
        self.assert_stable(data, cut)

    @settings(max_examples=300, deadline=None)
    @given(
        name=host_names(),
        before=other_extensions,
        after=other_extensions,
        suites=suite_lists,
        session_id=st.binary(max_size=32),
        version=st.sampled_from([b"\x03\x01", b"\x03\x02", b"\x03\x03"]),
        sizes=st.lists(st.integers(1, 16384), min_size=1, max_size=5),
        cut=st.integers(0, 10**6),
    )
    def test_hand_built(
        self, name, before, after, suites, session_id, version, sizes, cut
    ):
        """Hellos with random and GREASE extensions and suites give the name."""
        message = hello_message(
            [*before, sni_extension((0, name)), *after],
            version=version,
            session_id=session_id,
            suites=b"".join(u16(s) for s in suites),
        )
        hello = records(message, sizes)
        want = name.lower().removesuffix(b".").decode("ascii")
        self.assertEqual(parse_client_hello(hello), Hello(want))
        self.assertEqual(parse_client_hello(hello[: cut % len(hello)]), NeedMore())

    @settings(max_examples=500)
    @given(name=st.binary(min_size=1, max_size=300))
    def test_random_names(self, name):
        """Any host_name bytes give Hello: the normalised name or None."""
        result = parse_client_hello(records(hello_message([sni_extension((0, name))])))
        self.assertIsInstance(result, Hello)
        if result.server_name is not None:
            self.assertEqual(
                result.server_name.encode("ascii"), name.lower().removesuffix(b".")
            )

    @settings(max_examples=500)
    @given(body=st.binary(max_size=100), cut=st.integers(0, 10**6))
    def test_random_server_name_extension(self, body, cut):
        """A server_name extension with a random body never raises."""
        self.assert_stable(records(hello_message([(0, body)])), cut)

    @settings(max_examples=200, deadline=None)
    @given(
        label=st.sampled_from(sorted(python_hellos())),
        segments=st.lists(st.integers(1, 200), min_size=1),
    )
    def test_random_segments(self, label, segments):
        """Any TCP segmentation: NeedMore before the last segment, then Hello."""
        hello, name = python_hellos()[label]
        buffer = bytearray()
        pos, i = 0, 0
        while pos < len(hello):
            self.assertEqual(parse_client_hello(buffer), NeedMore())
            size = segments[i % len(segments)]
            buffer += hello[pos : pos + size]
            pos += size
            i += 1
        self.assertEqual(parse_client_hello(buffer), Hello(name))
