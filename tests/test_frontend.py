"""The front end in memory: openings, states, timers, caps and releases."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.frontendkit import Gateway, entry
from tests.tlshello import python_hello
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.relay import RelayState
from threshold.server.frontend import FrontendFactory, FrontendLimits
from threshold.server.registry import ClientRegistry
from threshold.server.routes import RouteTable, parse_tunnels
from threshold.server.serving import ServingTable
from threshold.server.sni import SniReader
from threshold.server.stats import GatewayStats, Limit, Refusal, Traffic
from threshold.testing import Collector, Frame, decode_frames
from threshold.wire import frames as F
from threshold.wire.clienthello import NeedMore, NotTls


class OpeningTests(SynchronousTestCase):
    """What a new user connection puts on the wire."""

    def setUp(self):
        self.stats = GatewayStats()
        self.registry = ClientRegistry()
        self.serving = ServingTable(self.registry, self.stats)
        self.routes = RouteTable(
            lambda host, port, factory: succeed(object()),
            lambda key: None,
            self.serving.update,
        )
        self.session = MuxSession(
            client=False,
            clock=Clock(),
            handler=StreamAcceptor(lambda s: Collector()),
            config=SessionConfig(keepalive_interval=0),
        )
        self.session.makeConnection(StringTransport())
        self.registry.connected("c", self.session, "c:1")
        self.addresses = (
            IPv4Address("TCP", "127.0.0.1", 9000),
            IPv4Address("TCP", "203.0.113.9", 51000),
        )

    def connect(self, entries, sent=b""):
        self.successResultOf(self.routes.apply(parse_tunnels(entries)))
        factory = FrontendFactory(
            ("127.0.0.1", 9000),
            self.routes,
            self.serving,
            Clock(),
            self.stats,
        )
        user = factory.buildProtocol(None)
        host, peer = self.addresses
        user.makeConnection(StringTransport(hostAddress=host, peerAddress=peer))
        if sent:
            user.dataReceived(sent)
        return decode_frames(self.session.transport.value())

    def test_syn_and_opening_in_one_go(self):
        """SYN, then one Data frame with header and PROXY line, no waiting."""
        frames = self.connect([entry(HaProxyProxyProtocol=True)])
        opening = b'{"service":"web"}\nPROXY TCP4 203.0.113.9 127.0.0.1 51000 9000\r\n'
        self.assertEqual(
            frames,
            [
                Frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2, 0),
                Frame(F.TYPE_DATA, 0, 2, len(opening), opening),
            ],
        )

    def test_hello_replayed_in_the_opening_frame(self):
        """With SNI routing, the bytes read travel in the same Data frame."""
        # A TLS record whose ClientHello is cut short: not TLS enough to
        # route by name, so the "*" entry takes it, bytes unchanged.
        hello = bytes.fromhex("160301000401000000")
        entries = [
            entry(glob="a.example.com", service="a"),
            entry(glob="*", service="other"),
        ]
        frames = self.connect(entries, sent=hello + b"GET /")
        data = [f for f in frames if f.type == F.TYPE_DATA]
        self.assertEqual(len(data), 1)
        self.assertEqual(data[0].payload, b'{"service":"other"}\n' + hello + b"GET /")


class StateTests(SynchronousTestCase):
    """One state per connection, from admission to close."""

    def test_states_of_an_sni_connection(self):
        """PREFIX while the hello is read, OPEN once routed, CLOSED at the end."""
        gateway = Gateway([entry(glob="a.example"), entry(glob="*", service="x")])
        hello = python_hello("a.example")
        user = gateway.connect(sent=hello[:10])
        self.assertIs(user.state, RelayState.PREFIX)
        user.dataReceived(hello[10:])
        gateway.pump.flush()
        self.assertIs(user.state, RelayState.OPEN)
        self.assertEqual(gateway.accepted[0].data, b'{"service":"web"}\n' + hello)
        user.transport.loseConnection()
        gateway.pump.flush()
        self.assertIs(user.state, RelayState.CLOSED)
        self.assertEqual(gateway.stats.open, 0)
        self.assertEqual(gateway.session.streams, {})
        self.assertEqual(gateway.client.streams, {})

    def test_bytes_counted_once_each_way(self):
        """The flow counts each relayed byte once; the totals add up at close."""
        gateway = Gateway([entry()])
        user = gateway.connect(sent=b"hello")
        user.dataReceived(b" world")
        service = gateway.accepted[0]
        service.transport.write(b"abc")
        gateway.pump.flush()
        self.assertEqual(service.data, b'{"service":"web"}\nhello world')
        self.assertEqual(user.transport.value(), b"abc")
        self.assertEqual((user.bytes_in, user.bytes_out), (11, 3))
        key = ("127.0.0.1", 9000, "*")
        self.assertEqual(gateway.stats.tunnels[key], Traffic(1, 1, 11, 3))
        user.transport.loseConnection()
        gateway.pump.flush()
        self.assertEqual(gateway.stats.tunnels[key], Traffic(1, 0, 11, 3))
        self.assertEqual(gateway.stats.clients["c"], Traffic(1, 0, 11, 3))

    def test_connection_lost_without_reason(self):
        """connectionLost() with no argument is a clean close, not a TypeError."""
        gateway = Gateway([entry()])
        user = gateway.connect()
        user.connectionLost()
        self.assertIs(user.state, RelayState.CLOSED)
        self.assertEqual(len(gateway.admission), 0)


class TimerTests(SynchronousTestCase):
    """The SNI deadline, the first-byte timeout and the idle timeout."""

    def test_sni_deadline_is_total(self):
        """A hello trickled in never completes: closed at the deadline anyway."""
        gateway = Gateway(
            [entry(glob="a.example")], FrontendLimits(sni_timeout=5, max_hello=20000)
        )
        user = gateway.connect(sent=b"\x16\x03\x01\x40\x00\x01\x00\x10\x00")
        for _ in range(4):
            gateway.advance(1)
            user.dataReceived(b"\x00")
        self.assertFalse(user.transport.ended)
        gateway.advance(1)
        self.assertTrue(user.transport.ended)
        self.assertEqual(gateway.stats.refused[Refusal.SNI_TIMEOUT], 1)
        self.assertEqual(gateway.session.streams, {})

    def test_first_byte_timeout(self):
        """No byte either way for the timeout: closed and counted."""
        gateway = Gateway([entry()], FrontendLimits(first_byte_timeout=30))
        silent = gateway.connect()
        gateway.advance(29.9)
        self.assertFalse(silent.transport.ended)
        gateway.advance(0.1)
        self.assertTrue(silent.transport.ended)
        self.assertEqual(gateway.stats.refused[Refusal.LIMIT_FIRST_BYTE], 1)
        # Its stream is gone on both sessions, its slot is free.
        self.assertEqual(gateway.session.streams, {})
        self.assertEqual(gateway.client.streams, {})
        self.assertEqual(len(gateway.admission), 0)

    def test_server_speaks_first(self):
        """A byte from the service counts: an SMTP user who waits is not cut."""
        gateway = Gateway([entry()], FrontendLimits(first_byte_timeout=30))
        user = gateway.connect()
        gateway.advance(1)
        gateway.accepted[0].transport.write(b"220 mail.example ESMTP\r\n")
        gateway.pump.flush()
        self.assertEqual(user.transport.value(), b"220 mail.example ESMTP\r\n")
        gateway.advance(3600)
        self.assertFalse(user.transport.ended)

    def test_user_speaks_first(self):
        """A byte from the user counts too; 0 disables the timeout."""
        gateway = Gateway([entry()], FrontendLimits(first_byte_timeout=30))
        user = gateway.connect(sent=b"x")
        gateway.advance(3600)
        self.assertFalse(user.transport.ended)
        gateway = Gateway([entry()], FrontendLimits(first_byte_timeout=0))
        user = gateway.connect()
        gateway.advance(3600)
        self.assertFalse(user.transport.ended)

    def test_idle_timeout(self):
        """Idle past the timeout: closed; kept active: not closed."""
        limits = FrontendLimits(idle_timeout=10, first_byte_timeout=0)
        gateway = Gateway([entry()], limits)
        idle = gateway.connect(sent=b"a")
        active = gateway.connect(sent=b"a", peer=("203.0.113.10", 1))
        for _ in range(9):
            gateway.advance(2)
            active.dataReceived(b"x")
        self.assertTrue(idle.transport.ended)
        self.assertFalse(active.transport.ended)
        self.assertEqual(gateway.stats.refused[Refusal.LIMIT_IDLE], 1)

    def test_shorter_timeout_applies_before_the_first_byte(self):
        """Before any byte the shorter of idle and first-byte applies."""
        limits = FrontendLimits(idle_timeout=5, first_byte_timeout=30)
        gateway = Gateway([entry()], limits)
        user = gateway.connect()
        gateway.advance(5)
        self.assertTrue(user.transport.ended)
        self.assertEqual(gateway.stats.refused[Refusal.LIMIT_IDLE], 1)
        self.assertEqual(gateway.stats.refused[Refusal.LIMIT_FIRST_BYTE], 0)


class CapTests(SynchronousTestCase):
    """Per-tunnel and per-source caps; a slot freed is usable again."""

    def test_per_source_across_groups_and_forms(self):
        """One IPv4 source, plain or IPv4-mapped, on two groups, is one count."""
        gateway = Gateway(
            [entry(port=9000), entry(port=9001)], FrontendLimits(max_per_ip=2)
        )
        a = gateway.connect(port=9000, peer=("192.0.2.7", 1000))
        b = gateway.connect(port=9001, peer=("::ffff:192.0.2.7", 1001))
        refused = gateway.connect(port=9001, peer=("192.0.2.7", 1002))
        self.assertFalse(a.transport.ended or b.transport.ended)
        self.assertTrue(refused.transport.ended)
        self.assertEqual(gateway.stats.refused[Refusal.LIMIT_SOURCE_IP], 1)
        self.assertEqual(gateway.stats.limits_hit[Limit.CONNECTIONS_PER_SOURCE_IP], 1)
        self.assertEqual(gateway.admission.source_count("192.0.2.7"), 2)
        # Another source is not affected; a freed slot is usable again.
        other = gateway.connect(peer=("192.0.2.8", 1))
        self.assertFalse(other.transport.ended)
        a.transport.loseConnection()
        again = gateway.connect(peer=("192.0.2.7", 1003))
        self.assertFalse(again.transport.ended)

    def test_ipv6_grouped_by_prefix(self):
        """Addresses of one /64 share a count; another /64 does not."""
        gateway = Gateway([entry()], FrontendLimits(max_per_ip=1))
        first = gateway.connect(peer=("2001:db8:1:2::1", 1))
        same = gateway.connect(peer=("2001:db8:1:2:ffff::9", 2))
        other = gateway.connect(peer=("2001:db8:1:3::1", 3))
        self.assertFalse(first.transport.ended)
        self.assertTrue(same.transport.ended)
        self.assertFalse(other.transport.ended)
        gateway = Gateway([entry()], FrontendLimits(max_per_ip=1, ipv6_prefix=128))
        gateway.connect(peer=("2001:db8:1:2::1", 1))
        self.assertFalse(gateway.connect(peer=("2001:db8:1:2::2", 1)).transport.ended)

    def test_per_tunnel(self):
        """Past MaxConnectionsPerTunnel the group's new connections are closed."""
        gateway = Gateway([entry()], FrontendLimits(max_per_tunnel=2))
        users = [gateway.connect(peer=(f"192.0.2.{i}", 1)) for i in range(3)]
        self.assertEqual([u.transport.ended for u in users], [False, False, True])
        self.assertEqual(gateway.stats.refused[Refusal.LIMIT_TUNNEL], 1)
        self.assertEqual(gateway.stats.limits_hit[Limit.CONNECTIONS_PER_TUNNEL], 1)
        self.assertEqual(gateway.stats.open, 2)
        users[0].transport.loseConnection()
        self.assertEqual(gateway.stats.open, 1)
        self.assertFalse(gateway.connect(peer=("192.0.2.9", 1)).transport.ended)

    def test_refusals_by_reason(self):
        """No route and no client are counted apart, each once."""
        gateway = Gateway([entry(glob="a.example")])
        gateway.connect(sent=python_hello("b.example"))
        gateway.disconnect("c")
        gateway.connect(sent=python_hello("a.example"))
        self.assertEqual(gateway.stats.refused[Refusal.NO_ROUTE], 1)
        self.assertEqual(gateway.stats.refused[Refusal.NO_HEALTHY_CLIENT], 1)
        self.assertEqual(gateway.stats.open, 0)
        self.assertEqual(len(gateway.admission), 0)


class SniReaderTests(SynchronousTestCase):
    """The SNI read's bounds beyond the parser's: reads."""

    def test_reads_bounded(self):
        """A hello still incomplete after max_reads reads is no ClientHello."""
        hello = python_hello("a.example")
        reader = SniReader(max_reads=10)
        for i in range(9):
            self.assertEqual(reader.feed(hello[i : i + 1]), NeedMore())
        result = reader.feed(hello[9:10])
        self.assertEqual(result, NotTls("no complete ClientHello in 10 reads"))
        self.assertTrue(result.bounded)
        self.assertEqual(reader.feed(hello[10:]), result)
        self.assertEqual(reader.replay(), hello[:10])

    def test_bounded_hello_counted_and_replayed(self):
        """A hello over the bound goes to "*" unchanged and counts the limit."""
        gateway = Gateway(
            [entry(glob="a.example"), entry(glob="*", service="other")],
            FrontendLimits(max_hello=1024),
        )
        big = b"\x16\x03\x01\x07\xd0\x01\x00\x07\xcc" + b"\x00" * 1500
        user = gateway.connect(sent=big)
        self.assertIs(user.state, RelayState.OPEN)
        self.assertEqual(gateway.accepted[0].data, b'{"service":"other"}\n' + big)
        self.assertEqual(gateway.stats.limits_hit[Limit.CLIENT_HELLO], 1)
        self.assertEqual(gateway.stats.sni_not_tls, 1)
