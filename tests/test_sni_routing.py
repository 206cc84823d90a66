"""SNI routing end to end: real TLS ClientHellos through a real server and client.

The backends are plain TCP recorders: they never answer the TLS handshake.
What is checked is which backend received the user's first bytes, and that
they arrive byte for byte as the user sent them. The hellos come from
Python's ``ssl`` module (through memory BIOs, so the exact bytes sent are
known) and from ``openssl s_client``; an independent parser below reads
their SNI, so the checks do not rest on threshold's own parser.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.components import missing
from tests.support import (
    Backend,
    Deployment,
    Recorder,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from tests.tlshello import python_hello
from threshold.server.stats import Refusal
from threshold.wire import clienthello

CLIENT = "TestClient1"

#: The routing group of most tests: an exact name, a wildcard, a fallback.
FULL_GROUP = [
    ("a.example.com", "svcA"),
    ("*.example.com", "svcB"),
    ("*", "svcC"),
]
#: The same without the fallback: unmatched connections are closed.
NO_FALLBACK_GROUP = FULL_GROUP[:2]

NOT_TLS = b"GET / HTTP/1.0\r\n\r\n"


def hello_extensions(data: bytes) -> dict[int, bytes]:
    """The extensions of the ClientHello at the start of ``data``, by type.

    Written independently of threshold.clienthello (RFC 8446 5.1 and 4.1.2),
    for well-formed hellos only: it reassembles the handshake records and
    walks the fixed fields.
    """
    message = b""
    pos = 0
    while len(message) < 4 or len(message) < 4 + int.from_bytes(message[1:4], "big"):
        assert data[pos] == 0x16, f"byte {pos} is not a handshake record"
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        message += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    assert message[0] == 1, "not a ClientHello"
    message = message[: 4 + int.from_bytes(message[1:4], "big")]
    p = 4 + 2 + 32  # handshake header, legacy_version, random
    p += 1 + message[p]  # session_id
    p += 2 + int.from_bytes(message[p : p + 2], "big")  # cipher_suites
    p += 1 + message[p]  # compression_methods
    extensions: dict[int, bytes] = {}
    if p == len(message):
        return extensions
    end = p + 2 + int.from_bytes(message[p : p + 2], "big")
    p += 2
    while p < end:
        kind = int.from_bytes(message[p : p + 2], "big")
        size = int.from_bytes(message[p + 2 : p + 4], "big")
        extensions[kind] = message[p + 4 : p + 4 + size]
        p += 4 + size
    return extensions


def sni_of(data: bytes) -> str | None:
    """The SNI host name of a ClientHello as sent (case and dot kept)."""
    body = hello_extensions(data).get(0)
    if body is None:
        return None
    # server_name_list length (2), name_type (1), host_name length (2).
    assert body[2] == 0, "first server name is not a host_name"
    size = int.from_bytes(body[3:5], "big")
    return body[5 : 5 + size].decode("ascii")


class _OpenSsl(ProcessProtocol):
    """An ``openssl s_client`` run: stdin closed, output kept."""

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.ended: Deferred[Any] = Deferred()
        self.running = False

    def connectionMade(self) -> None:  # noqa: N802
        self.running = True
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output.append(data)

    errReceived = outReceived  # noqa: N815

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.running = False
        self.ended.callback(reason.value.exitCode)


def _stop_process(process: _OpenSsl) -> Deferred[Any] | None:
    """Kill a process still running at cleanup and wait for its end."""
    if not process.running:
        return None
    process.transport.signalProcess("KILL")
    return process.ended


def _send_one_byte_at_a_time(port: int, data: bytes) -> bytes:
    """Send ``data`` one byte per TCP segment, half-close, read to the end.

    Runs in a thread; returns what the connection received.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            time.sleep(0.001)
        sock.shutdown(socket.SHUT_WR)
        received = []
        while chunk := sock.recv(65536):
            received.append(chunk)
    return b"".join(received)


class _Fixture(TestCase):
    """A deployment with one client and three recording backends A, B, C."""

    use_tls = False
    server_fields: dict[str, Any] = {}
    timeout = 20

    @inlineCallbacks
    def setUp(self):
        self.backends: dict[str, Backend] = {}
        services = {}
        for name in ("svcA", "svcB", "svcC"):
            backend = Backend(echo=False)
            port = yield backend.start()
            self.addCleanup(backend.stop)
            self.backends[name] = backend
            services[name] = ("127.0.0.1", port)
        self.deployment = Deployment(self.use_tls, self.mktemp(), **self.server_fields)
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.deployment.start_client(CLIENT, services)
        yield self.deployment.wait_connected(CLIENT)

    @inlineCallbacks
    def put_groups(self, *groups: list[tuple[str, str]]):
        """Open one tunnel port per group of (glob, service); return the ports."""
        ports = [free_port() for _ in groups]
        entries = [
            tunnel(CLIENT, port, service, ListenHostnameGlob=glob)
            for port, group in zip(ports, groups, strict=True)
            for glob, service in group
        ]
        code, body = yield self.deployment.put_tunnels(entries)
        self.assertEqual(code, 200, body)
        return ports

    def connection_counts(self) -> dict[str, int]:
        return {name: len(b.connections) for name, b in self.backends.items()}

    @inlineCallbacks
    def assert_routed(
        self, user: Recorder, sent: bytes, service: str, before: dict[str, int]
    ):
        """``sent`` reaches ``service`` exactly, and no other backend.

        The user half-closes; the EOF travels to the backend, which closes,
        and that close travels back: then everything sent has arrived.
        ``before`` is :meth:`connection_counts` taken before the user
        connected: exactly one new backend connection may appear.
        """
        user.transport.loseWriteConnection()
        yield wait_until(lambda: user.lost is not None, timeout=5, what="the end")
        expected = dict(before)
        expected[service] += 1
        self.assertEqual(self.connection_counts(), expected)
        connection = self.backends[service].connections[-1]
        yield connection.done
        self.assertTrue(connection.eof)
        self.assertEqual(connection.data, sent)

    @inlineCallbacks
    def assert_closed(self, user: Recorder, before: dict[str, int]):
        """The user is closed without an answer, and no backend is connected."""
        yield wait_until(lambda: user.lost is not None, timeout=5, what="close")
        self.assertEqual(user.data, b"")
        self.assertEqual(self.connection_counts(), before)

    @inlineCallbacks
    def send(self, port: int, data: bytes):
        """Connect as a user, send ``data``; return (user, counts before)."""
        before = self.connection_counts()
        user = yield connect_user(port)
        user.transport.write(data)
        return user, before


class RoutingMixin:
    """Real TLS ClientHellos routed by SNI: exact, wildcard, fallback."""

    @inlineCallbacks
    def route(self, data: bytes, service: str):
        (port,) = yield self.put_groups(FULL_GROUP)
        user, before = yield self.send(port, data)
        yield self.assert_routed(user, data, service, before)

    def test_exact_name(self):
        """A hello for a.example.com goes to the exact entry, bytes unchanged."""
        hello = python_hello("a.example.com")
        self.assertEqual(sni_of(hello), "a.example.com")
        return self.route(hello, "svcA")

    def test_exact_name_case_and_trailing_dot(self):
        """A.Example.COM. matches the exact entry: case and final dot ignored."""
        hello = python_hello("A.Example.COM.")
        self.assertEqual(sni_of(hello), "A.Example.COM.")
        return self.route(hello, "svcA")

    def test_wildcard_one_label(self):
        """b.example.com matches *.example.com."""
        hello = python_hello("b.example.com")
        self.assertEqual(sni_of(hello), "b.example.com")
        return self.route(hello, "svcB")

    def test_wildcard_several_labels(self):
        """x.y.example.com matches *.example.com (one or more labels, routes.py)."""
        hello = python_hello("x.y.example.com")
        self.assertEqual(sni_of(hello), "x.y.example.com")
        return self.route(hello, "svcB")

    def test_wildcard_does_not_match_bare_domain(self):
        """example.com itself does not match *.example.com: it falls back to '*'."""
        return self.route(python_hello("example.com"), "svcC")

    def test_other_name_falls_back(self):
        """A name no glob matches goes to the '*' entry."""
        return self.route(python_hello("other.org"), "svcC")

    def test_no_sni_falls_back(self):
        """A hello without SNI goes to the '*' entry."""
        hello = python_hello(None)
        self.assertIsNone(sni_of(hello))
        return self.route(hello, "svcC")

    def test_not_tls_replayed(self):
        """Plain HTTP goes to the '*' entry with its bytes replayed unchanged."""
        return self.route(NOT_TLS, "svcC")


class PlainRoutingTests(RoutingMixin, _Fixture):
    """Routing, with a plain tunnel control connection."""


class TlsRoutingTests(RoutingMixin, _Fixture):
    """Routing, with mutual TLS on the tunnel control connection."""

    use_tls = True


class TlsClientTests(_Fixture):
    """Other real TLS clients and ways of sending the hello."""

    @inlineCallbacks
    def test_openssl_s_client(self):
        """openssl s_client's hello reaches the backend its -servername selects."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise missing("openssl is not installed")
        (port,) = yield self.put_groups(FULL_GROUP)
        for name, service in [("a.example.com", "svcA"), ("other.org", "svcC")]:
            before = self.connection_counts()
            process = _OpenSsl()
            reactor.spawnProcess(
                process,
                openssl,
                [
                    openssl,
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-servername",
                    name,
                ],
                env={"PATH": os.environ.get("PATH", "")},
            )
            self.addCleanup(_stop_process, process)
            backend = self.backends[service]
            yield wait_until(
                lambda b=backend, n=before[service]: (
                    len(b.connections) > n
                    and not isinstance(
                        clienthello.parse_client_hello(b.connections[-1].data),
                        clienthello.NeedMore,
                    )
                ),
                timeout=5,
                what=f"openssl's hello at {service}",
            )
            data = backend.connections[-1].data
            self.assertEqual(data[0], 0x16)
            self.assertEqual(sni_of(data), name)
            self.assertEqual(
                clienthello.parse_client_hello(data), clienthello.Hello(name)
            )
            expected = dict(before)
            expected[service] += 1
            self.assertEqual(self.connection_counts(), expected)
            # The backend never answers: closing it ends s_client.
            backend.connections[-1].transport.loseConnection()
            exit_code = yield process.ended
            self.assertNotEqual(exit_code, 0, b"".join(process.output))

    @inlineCallbacks
    def test_one_byte_segments(self):
        """A hello sent one byte per TCP segment still routes and replays exactly."""
        calls = []
        feed = clienthello.ClientHelloParser.feed

        def counting(parser: Any, data: Any) -> Any:
            calls.append(len(data))
            return feed(parser, data)

        self.patch(clienthello.ClientHelloParser, "feed", counting)
        hello = python_hello("x.y.example.com")
        (port,) = yield self.put_groups(FULL_GROUP)
        received = yield deferToThread(_send_one_byte_at_a_time, port, hello)
        self.assertEqual(received, b"")
        self.assertEqual(self.connection_counts(), {"svcA": 0, "svcB": 1, "svcC": 0})
        connection = self.backends["svcB"].connections[0]
        yield connection.done
        self.assertEqual(connection.data, hello)
        # The front end really saw the hello in pieces (loopback may merge a
        # few segments when the reactor is busy, never most of them).
        self.assertGreater(len(calls), len(hello) // 4)
        # Each byte is handed to the parser once, never the buffer again.
        self.assertEqual(sum(calls), len(hello))

    @inlineCallbacks
    def test_tls12_only_hello(self):
        """A TLS 1.2-only hello (no supported_versions) routes by its SNI."""
        hello = python_hello("a.example.com", maximum=ssl.TLSVersion.TLSv1_2)
        self.assertNotIn(0x002B, hello_extensions(hello))
        (port,) = yield self.put_groups(FULL_GROUP)
        user, before = yield self.send(port, hello)
        yield self.assert_routed(user, hello, "svcA", before)

    @inlineCallbacks
    def test_tls13_only_hello(self):
        """A TLS 1.3-only hello (supported_versions, key_share) routes by its SNI."""
        hello = python_hello("b.example.com", minimum=ssl.TLSVersion.TLSv1_3)
        extensions = hello_extensions(hello)
        self.assertIn(0x002B, extensions)
        self.assertIn(0x0033, extensions)
        (port,) = yield self.put_groups(FULL_GROUP)
        user, before = yield self.send(port, hello)
        yield self.assert_routed(user, hello, "svcB", before)

    @inlineCallbacks
    def test_hello_split_over_records(self):
        """A hello split over several TLS records routes, replayed unchanged."""
        hello = python_hello("a.example.com")
        message = hello[5:]
        records = b"".join(
            hello[:3] + len(chunk).to_bytes(2, "big") + chunk
            for chunk in (message[i : i + 100] for i in range(0, len(message), 100))
        )
        self.assertGreater(len(records), len(hello))
        self.assertEqual(sni_of(records), "a.example.com")
        (port,) = yield self.put_groups(FULL_GROUP)
        user, before = yield self.send(port, records)
        yield self.assert_routed(user, records, "svcA", before)

    @inlineCallbacks
    def test_bytes_after_hello_follow_it(self):
        """Bytes sent with or after the hello reach the backend after it, in order."""
        hello = python_hello("a.example.com")
        (port,) = yield self.put_groups(FULL_GROUP)
        user, before = yield self.send(port, hello + b"early")
        backend = self.backends["svcA"]
        yield wait_until(lambda: len(backend.connections) == 1, what="route")
        user.transport.write(b" and later")
        yield self.assert_routed(user, hello + b"early and later", "svcA", before)


class RefusalTests(_Fixture):
    """What cannot be routed is closed, and counted as what it was."""

    @inlineCallbacks
    def test_matching_name_still_routes(self):
        """In a group without '*', a matching name routes as usual."""
        (port,) = yield self.put_groups(NO_FALLBACK_GROUP)
        hello = python_hello("c.example.com")
        user, before = yield self.send(port, hello)
        yield self.assert_routed(user, hello, "svcB", before)

    @inlineCallbacks
    def test_unmatched_closed(self):
        """Unknown name, no SNI, not TLS: the user is closed, no backend is used."""
        (port,) = yield self.put_groups(NO_FALLBACK_GROUP)
        stats = self.deployment.server.stats
        for data in [python_hello("other.org"), python_hello(None), NOT_TLS]:
            refused = stats.refused[Refusal.NO_ROUTE]
            user, before = yield self.send(port, data)
            yield self.assert_closed(user, before)
            self.assertEqual(stats.refused[Refusal.NO_ROUTE], refused + 1)
        self.assertEqual(stats.refused[Refusal.NO_HEALTHY_CLIENT], 0)

    @inlineCallbacks
    def test_client_gone_closed(self):
        """A route whose client is gone closes the user, counted as no client."""
        (port,) = yield self.put_groups(FULL_GROUP)
        yield self.deployment.stop_client(CLIENT)
        registry = self.deployment.server.registry
        yield wait_until(lambda: not registry.is_connected(CLIENT), what="gone")
        stats = self.deployment.server.stats
        for data in [python_hello("a.example.com"), NOT_TLS]:
            refused = stats.refused[Refusal.NO_HEALTHY_CLIENT]
            user, before = yield self.send(port, data)
            yield self.assert_closed(user, before)
            self.assertEqual(stats.refused[Refusal.NO_HEALTHY_CLIENT], refused + 1)
        self.assertEqual(stats.refused[Refusal.NO_ROUTE], 0)


class _LogWatch:
    """Collects warnings, errors and failures logged while it is on."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if (
            "log_failure" in event
            or event.get("isError")
            or level in (LogLevel.warn, LogLevel.error, LogLevel.critical)
        ):
            self.events.append(event)


class SlowAndBadInputTests(_Fixture):
    """A short SNI read timeout, silent users and garbage."""

    server_fields = {"sni_read_timeout_seconds": 0.5}

    @inlineCallbacks
    def test_silent_users_timed_out_others_routed(self):
        """Silent and half-hello users are closed at the timeout; others pass."""
        (port,) = yield self.put_groups(FULL_GROUP)
        stats = self.deployment.server.stats
        start = time.monotonic()
        silent = yield connect_user(port)
        hello = python_hello("a.example.com")
        half, _ = yield self.send(port, hello[: len(hello) // 2])
        # Meanwhile a user with a whole hello is routed at once.
        user, before = yield self.send(port, hello)
        backend = self.backends["svcA"]
        yield wait_until(
            lambda: (
                len(backend.connections) == 1 and backend.connections[0].data == hello
            ),
            timeout=5,
            what="the full hello routed",
        )
        self.assertIsNone(silent.lost)
        self.assertIsNone(half.lost)

        yield wait_until(
            lambda: silent.lost is not None and half.lost is not None,
            timeout=5,
            what="the silent users closed",
        )
        elapsed = time.monotonic() - start
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 2.0)
        self.assertEqual(stats.refused[Refusal.SNI_TIMEOUT], 2)
        self.assertEqual(silent.data + half.data, b"")
        # The routed user is past the timeout and still relayed.
        self.assertIsNone(user.lost)
        user.transport.write(b"still here")
        yield self.assert_routed(user, hello + b"still here", "svcA", before)
        self.assertEqual(stats.refused[Refusal.SNI_TIMEOUT], 2)
        self.assertEqual(self.connection_counts(), {"svcA": 1, "svcB": 0, "svcC": 0})

    @inlineCallbacks
    def test_garbage(self):
        """Garbage goes to '*' unchanged, or is closed without it; nothing raises."""
        rng = random.Random(4)
        valid = python_hello("a.example.com")
        bad_length = bytearray(valid)
        # The extensions block's length, made to run past the message.
        # Python's hello is one record ending with the extensions.
        ext_at = (
            len(valid)
            - 2
            - sum(4 + len(body) for body in hello_extensions(valid).values())
        )
        self.assertNotEqual(valid[ext_at : ext_at + 2], b"\xff\xff")
        bad_length[ext_at : ext_at + 2] = b"\xff\xff"
        cases = [
            # A record longer than TLS allows.
            b"\x16\x03\x01\xff\xff" + rng.randbytes(200),
            # A ClientHello declaring 16 MiB.
            b"\x16\x03\x01\x00\x08\x01\xff\xff\xff" + rng.randbytes(4),
            # An alert record, an SSLv2-style hello, an empty record.
            b"\x15\x03\x03\x00\x02\x02\x28",
            b"\x80\x2e\x01\x00\x02" + rng.randbytes(41),
            b"\x16\x03\x01\x00\x00",
            # A complete record whose ClientHello lengths do not add up.
            bytes(bad_length),
            # A valid hello whose name is not a host name: no SNI, so '*'.
            valid.replace(b"a.example.com", b"a.exam!le.com"),
        ]
        cases += [
            bytes([rng.choice([b for b in range(256) if b != 0x16])])
            + rng.randbytes(rng.randrange(0, 3000))
            for _ in range(5)
        ]
        fallback, strict = yield self.put_groups(FULL_GROUP, NO_FALLBACK_GROUP)
        # Watch from here: starting without TLS logs a warning, on purpose.
        log = _LogWatch()
        globalLogPublisher.addObserver(log)
        self.addCleanup(globalLogPublisher.removeObserver, log)
        for data in cases:
            self.assertIsInstance(
                clienthello.parse_client_hello(data),
                clienthello.NotTls | clienthello.Hello,
            )
            user, before = yield self.send(fallback, data)
            yield self.assert_routed(user, data, "svcC", before)
            user, before = yield self.send(strict, data)
            yield self.assert_closed(user, before)

        # A record that promises more than ever comes: closed at the timeout.
        timeouts = self.deployment.server.stats.refused[Refusal.SNI_TIMEOUT]
        before = self.connection_counts()
        users = []
        for port in (fallback, strict):
            user = yield connect_user(port)
            user.transport.write(b"\x16\x03\x01\x40\x00\x01\x00\x3f")
            users.append(user)
        for user in users:
            yield self.assert_closed(user, before)
        self.assertEqual(
            self.deployment.server.stats.refused[Refusal.SNI_TIMEOUT], timeouts + 2
        )

        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(log.events, [])
