"""Issue 11, item 1: a ClientHello in one-byte records must not cost quadratic CPU.

The attack: a 16 KiB ClientHello sent as 2,730 one-byte TLS records, one
per TCP segment. The front end used to re-parse its whole buffer from byte
0 on every segment (about 6.8 s of CPU per connection). Now each segment is
fed once to an incremental parser, and a hello may span at most
``DEFAULT_MAX_RECORDS`` records and ``MAX_HELLO_READS`` reads: the work is
measured here by what the parser is handed, not by wall time.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import Backend, Deployment, free_port, tunnel, wait_until
from tests.test_clienthello import hello_message, records, sni_extension
from threshold.server.stats import Limit
from threshold.wire import clienthello

RECORDS = 2730


def one_byte_record_hello(name: bytes = b"a.example.com") -> bytes:
    """A ClientHello message of RECORDS bytes, one byte per TLS record."""
    bare = hello_message([sni_extension((0, name)), (0x0015, b"")])
    padding = RECORDS - len(bare)
    message = hello_message([sni_extension((0, name)), (0x0015, b"\x00" * padding)])
    assert len(message) == RECORDS
    return records(message, [1])


def send_records(port: int, data: bytes) -> None:
    """Each 6-byte record in its own send (TCP_NODELAY), then half-close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), 6):
            sock.sendall(data[i : i + 6])
            if i % 60 == 0:
                # Let the gateway read segment by segment, as over a WAN.
                time.sleep(0.0002)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


class OneByteRecordTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.backends = {}
        services = {}
        for service in ("named", "fallback"):
            backend = Backend(echo=False)
            port = yield backend.start()
            self.addCleanup(backend.stop)
            self.backends[service] = backend
            services[service] = ("127.0.0.1", port)
        self.deployment = Deployment(False, self.mktemp())
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.deployment.start_client("TestClient1", services)
        yield self.deployment.wait_connected("TestClient1")
        self.port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [
                tunnel(
                    "TestClient1",
                    self.port,
                    "named",
                    ListenHostnameGlob="a.example.com",
                ),
                tunnel("TestClient1", self.port, "fallback", ListenHostnameGlob="*"),
            ]
        )
        self.assertEqual(code, 200, body)

    def count_parser_input(self) -> list[int]:
        """Record the size of every buffer handed to the ClientHello parser."""
        calls: list[int] = []
        parse = clienthello.parse_client_hello

        def counting_parse(data: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(len(data))
            return parse(data, *args, **kwargs)

        self.patch(clienthello, "parse_client_hello", counting_parse)
        parser = getattr(clienthello, "ClientHelloParser", None)
        if parser is not None:
            feed = parser.feed

            def counting_feed(self: Any, data: Any) -> Any:
                calls.append(len(data))
                return feed(self, data)

            self.patch(parser, "feed", counting_feed)
        return calls

    @inlineCallbacks
    def test_work_is_linear_and_bounded(self):
        """The parser is handed each byte at most once; the hello is cut short."""
        data = one_byte_record_hello()
        self.assertEqual(len(data), 6 * RECORDS)
        calls = self.count_parser_input()
        yield deferToThread(send_records, self.port, data)
        fallback = self.backends["fallback"]
        relayed = [b.connections for b in self.backends.values()]
        yield wait_until(
            lambda: any(c and c[0].done.called for c in relayed),
            10,
            "the connection to be relayed",
        )
        # The gateway really read the hello in many pieces.
        self.assertGreater(len(calls), 20)
        # Linear: never the same byte twice (re-parsing from byte 0 on each
        # segment hands the parser about len(calls) * len(data) / 2 bytes).
        self.assertLessEqual(sum(calls), len(data))
        # Bounded: past DEFAULT_MAX_RECORDS records it is no ClientHello; it
        # goes to "*" with every byte replayed unchanged.
        self.assertLessEqual(sum(calls), 6 * clienthello.DEFAULT_MAX_RECORDS + 65536)
        self.assertEqual(fallback.connections[0].data, data)
        self.assertEqual(self.backends["named"].connections, [])
        stats = self.deployment.server.stats
        self.assertEqual(stats.limits_hit[Limit.CLIENT_HELLO], 1)
        self.assertEqual(stats.sni_not_tls, 1)
