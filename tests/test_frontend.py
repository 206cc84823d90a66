"""The front end in memory: what a new user connection puts on the wire."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.server.frontend import FrontendFactory, FrontendStats
from threshold.server.routes import RouteTable, parse_tunnels
from threshold.testing import Collector
from threshold.wire import frames as F


class OpeningTests(SynchronousTestCase):
    def setUp(self):
        self.routes = RouteTable(
            lambda host, port, factory: succeed(object()),
            lambda key: None,
            lambda client_id: True,
        )
        self.session = MuxSession(
            client=False,
            clock=Clock(),
            handler=StreamAcceptor(lambda s: Collector()),
            config=SessionConfig(keepalive_interval=0),
        )
        self.session.makeConnection(StringTransport())

    def connect(self, entries, sent=b""):
        self.successResultOf(self.routes.apply(parse_tunnels(entries)))
        factory = FrontendFactory(
            ("127.0.0.1", 9000),
            self.routes,
            lambda client_id: self.session,
            Clock(),
            FrontendStats(),
        )
        user = factory.buildProtocol(None)
        user.makeConnection(
            StringTransport(
                hostAddress=IPv4Address("TCP", "127.0.0.1", 9000),
                peerAddress=IPv4Address("TCP", "203.0.113.9", 51000),
            )
        )
        if sent:
            user.dataReceived(sent)
        return F.decode_frames(self.session.transport.value())

    def test_syn_and_opening_in_one_go(self):
        """SYN, then one Data frame with header and PROXY line, no waiting."""
        frames = self.connect(
            [
                {
                    "ClientId": "c",
                    "ListenAddress": "127.0.0.1",
                    "ListenPort": 9000,
                    "BackEndService": "web",
                    "HaProxyProxyProtocol": True,
                }
            ]
        )
        opening = b'{"service":"web"}\nPROXY TCP4 203.0.113.9 127.0.0.1 51000 9000\r\n'
        self.assertEqual(
            frames,
            [
                F.Frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2, 0),
                F.Frame(F.TYPE_DATA, 0, 2, len(opening), opening),
            ],
        )

    def test_hello_replayed_in_the_opening_frame(self):
        """With SNI routing, the bytes read travel in the same Data frame."""
        hello = bytes.fromhex(
            # A TLS record whose ClientHello is cut short: not TLS enough to
            # route by name, so the "*" entry takes it, bytes unchanged.
            "160301000401000000"
        )
        entries = [
            {
                "ClientId": "c",
                "ListenAddress": "127.0.0.1",
                "ListenPort": 9000,
                "ListenHostnameGlob": glob,
                "BackEndService": service,
            }
            for glob, service in (("a.example.com", "a"), ("*", "other"))
        ]
        frames = self.connect(entries, sent=hello + b"GET /")
        data = [f for f in frames if f.type == F.TYPE_DATA]
        self.assertEqual(len(data), 1)
        self.assertEqual(data[0].payload, b'{"service":"other"}\n' + hello + b"GET /")
