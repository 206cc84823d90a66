"""The gateway's egress in memory: a client session, odd streams, fake sockets.

The control factory runs with an :class:`EgressGate` whose reactor is a
``MemoryReactorClock``: each connection out is an entry of ``tcpClients``
that the test makes succeed (a ``StringTransport``) or fail; names are
looked up by a resolver whose answers the test gives.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from threshold.config.egress import EGRESS_POLICY
from threshold.config.policy import ClientPolicy, FrozenMap
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.server.control import ControlFactory, ControlSettings
from threshold.server.egress import EgressPhase
from threshold.server.egress_gate import EgressGate, EgressSettings
from threshold.server.policy import GatewayPolicy, PolicySettings
from threshold.server.registry import ClientRegistry
from threshold.server.stats import GatewayStats
from threshold.testing import Collector
from threshold.wire.egress import EgressRefusal, encode_request
from threshold.wire.handshake import MAX_LINE, encode_hello

QUIET = SessionConfig(keepalive_interval=0)
CLIENT = "home-a"

POLICY = {
    CLIENT: [
        {"Cidr": "0.0.0.0/0", "Ports": "25,465,587"},
        {"Cidr": "127.0.0.0/8", "Ports": "8080"},
    ],
}


class Resolver:
    """Answers the test gives: ``answer(name, addresses)`` or ``fail(name)``."""

    def __init__(self) -> None:
        self.pending: dict[str, Deferred] = {}

    def __call__(self, host: str, port: int) -> Deferred:
        d = self.pending[host] = Deferred()
        return d

    def answer(self, host: str, addresses: list[str]) -> None:
        self.pending.pop(host).callback(addresses)

    def fail(self, host: str) -> None:
        self.pending.pop(host).errback(DNSLookupError(host))


class HalfClosing(StringTransport):
    """A transport that can shut its write side alone, as TCP can."""

    write_closed = False

    def loseWriteConnection(self) -> None:  # noqa: N802
        self.write_closed = True


class Gateway:
    """A control factory with an egress gate, and one client session on it."""

    def __init__(self, policy=POLICY, quota: int = 0, limits=None, **settings) -> None:
        self.reactor = MemoryReactorClock()
        self.stats = GatewayStats()
        self.resolver = Resolver()
        limits = dict(limits or {}, quota_bytes=quota) if quota or limits else None
        client_policies = FrozenMap({CLIENT: ClientPolicy(**limits)} if limits else {})
        self.policy = GatewayPolicy(
            PolicySettings(client_policies=client_policies), self.reactor, self.stats
        )
        self.gate = EgressGate(
            EgressSettings(EGRESS_POLICY.check(policy), **settings),
            self.reactor,
            self.stats,
            self.policy,
            self.resolver,
        )
        self.registry = ClientRegistry()
        self.factory = ControlFactory(
            self.registry,
            ControlSettings(session=QUIET),
            self.reactor,
            self.stats,
            egress=self.gate,
        )
        address = IPv4Address("TCP", "10.0.0.1", 40000)
        self.client, self.session, self.pump = iosim.connectedServerAndClient(
            lambda: self.factory.buildProtocol(address),
            lambda: MuxSession(
                client=True,
                clock=self.reactor,
                handler=StreamAcceptor(lambda s: Collector()),
                config=QUIET,
            ),
            clock=self.reactor,
        )

    def hello(self, client_id: str = CLIENT) -> None:
        stream = self.client.open_stream(Collector())
        stream.write(encode_hello(client_id))
        self.pump.flush()

    def open(self, line: bytes | None = None, host: str = "", port: int = 25):
        """An odd stream with a request; its Collector."""
        collector = Collector()
        stream = self.client.open_stream(collector)
        stream.write(line if line is not None else encode_request(host, port))
        self.pump.flush()
        return collector

    def connection(self, index: int = -1):
        """(host, port, factory) of a connection out."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        return host, port, factory

    def succeed(self, index: int = -1, kind=StringTransport):
        """Make a connection out succeed; (its transport, its protocol)."""
        _host, _port, factory = self.connection(index)
        protocol = factory.buildProtocol(None)
        transport = kind(
            hostAddress=IPv4Address("TCP", "203.0.113.1", 40312),
            peerAddress=IPv4Address("TCP", "93.184.216.34", 25),
        )
        protocol.makeConnection(transport)
        self.pump.flush()
        return transport, protocol

    def fail(self, reason: Exception, index: int = -1) -> None:
        _host, _port, factory = self.connection(index)
        factory.clientConnectionFailed(None, Failure(reason))
        self.pump.flush()

    @property
    def traffic(self):
        return self.stats.egress.clients[CLIENT]


def answer(collector: Collector) -> dict:
    line, _, _ = collector.data.partition(b"\n")
    return json.loads(line)


class RefusalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = Gateway()
        self.gw.hello()

    def assertRefused(self, collector, reason: EgressRefusal) -> None:
        got = answer(collector)
        self.assertEqual((got["ok"], got["reason"]), (False, reason.value), got)
        self.assertTrue(collector.read_closed, "stream closed after the refusal")
        self.assertEqual(self.gw.traffic.refused[reason], 1)
        collector.transport.loseConnection()  # as the client's SOCKS side does
        self.gw.pump.flush()
        self.assertEqual(self.gw.traffic.open, 0)
        # The session stays up and serves the next request.
        self.assertTrue(self.gw.registry.is_connected(CLIENT))
        self.assertFalse(self.gw.client.closed)

    def test_address_not_allowed(self):
        """A port no rule names; a private address 0.0.0.0/0 does not name."""
        self.assertRefused(
            self.gw.open(host="93.184.216.34", port=80), EgressRefusal.NOT_ALLOWED
        )
        self.gw.open(host="10.0.0.1", port=25)
        self.gw.open(host="127.0.0.1", port=25)
        self.assertEqual(self.gw.traffic.refused[EgressRefusal.NOT_ALLOWED], 3)
        self.assertEqual(self.gw.reactor.tcpClients, [])

    def test_malformed_requests(self):
        """Malformed lines, a line too long, EOF before a line: bad_request."""
        for line in (b"nonsense\n", b'{"connect": "x"}\n', b'{"connect": "a:0"}\n'):
            collector = self.gw.open(line)
            self.assertEqual(answer(collector)["reason"], "bad_request")
            collector.transport.loseConnection()
        long = self.gw.open(b"x" * (MAX_LINE + 1))
        self.assertEqual(answer(long)["reason"], "bad_request")
        long.transport.loseConnection()
        collector = Collector()
        stream = self.gw.client.open_stream(collector)
        stream.write(b'{"connect": ')
        stream.loseWriteConnection()
        self.gw.pump.flush()
        self.assertEqual(answer(collector)["reason"], "bad_request")
        self.assertTrue(collector.read_closed)
        self.gw.pump.flush()
        self.assertEqual(self.gw.traffic.refused[EgressRefusal.BAD_REQUEST], 5)
        self.assertEqual(self.gw.traffic.open, 0)
        self.assertFalse(self.gw.client.closed)

    def test_name_resolving_to_forbidden_addresses(self):
        """Every address of a name is checked: all forbidden, refused, no
        connection made."""
        collector = self.gw.open(host="rebind.example", port=25)
        self.assertIs(self.gw.gate.stats.egress.open_count(CLIENT), 1)
        self.gw.resolver.answer("rebind.example", ["127.0.0.1", "10.1.1.1", "::1"])
        self.gw.pump.flush()
        self.assertRefused(collector, EgressRefusal.NOT_ALLOWED)
        self.assertIn("127.0.0.1", answer(collector)["error"])
        self.assertEqual(self.gw.reactor.tcpClients, [])

    def test_name_not_resolved(self):
        """A lookup that fails: name_not_resolved; one that gives nothing too."""
        collector = self.gw.open(host="nowhere.example")
        self.gw.resolver.fail("nowhere.example")
        self.gw.pump.flush()
        self.assertRefused(collector, EgressRefusal.NAME_NOT_RESOLVED)

    def test_lookup_timeout(self):
        """A lookup that does not answer within the connect timeout: timeout."""
        collector = self.gw.open(host="slow.example")
        self.gw.reactor.advance(9.9)
        self.gw.pump.flush()
        self.assertEqual(collector.data, b"")
        self.gw.reactor.advance(0.2)
        self.gw.pump.flush()
        self.assertRefused(collector, EgressRefusal.TIMEOUT)

    def test_connection_refused(self):
        """The destination refuses: connection_refused."""
        collector = self.gw.open(host="93.184.216.34")
        self.gw.fail(ConnectionRefusedError())
        self.assertRefused(collector, EgressRefusal.CONNECTION_REFUSED)

    def test_unreachable(self):
        """No route: unreachable."""
        collector = self.gw.open(host="93.184.216.34")
        self.gw.fail(NoRouteError())
        self.assertRefused(collector, EgressRefusal.UNREACHABLE)


class PolicyStateTests(SynchronousTestCase):
    def test_disabled(self):
        """A gateway without EgressPolicy answers disabled; the session stays."""
        gw = Gateway(policy={})
        gw.hello()
        got = answer(gw.open(host="93.184.216.34"))
        self.assertEqual(got["reason"], "disabled")
        self.assertTrue(gw.registry.is_connected(CLIENT))
        self.assertEqual(answer(gw.open(host="93.184.216.34"))["reason"], "disabled")

    def test_client_without_entry(self):
        """A client not in EgressPolicy: no_policy."""
        gw = Gateway()
        gw.hello("home-b")
        got = answer(gw.open(host="93.184.216.34"))
        self.assertEqual(got["reason"], "no_policy")
        self.assertEqual(gw.stats.egress.clients["home-b"].refused["no_policy"], 1)

    def test_before_the_hello(self):
        """An odd stream before the hello is refused (reset), as before."""
        gw = Gateway()
        gw.client.open_stream(Collector())  # stream 1, no hello yet
        collector = gw.open(host="93.184.216.34")
        self.assertIsNotNone(collector.lost)
        self.assertEqual(collector.data, b"")
        self.assertEqual(gw.stats.egress.clients, {})

    def test_limit(self):
        """MaxEgressConnectionsPerClient open at once; one more is refused,
        and one is accepted again once one ends."""
        gw = Gateway(max_per_client=2)
        gw.hello()
        first = gw.open(host="a.example")
        gw.open(host="b.example")
        third = gw.open(host="c.example")
        self.assertEqual(answer(third)["reason"], "limit")
        third.transport.loseConnection()
        first.transport.abortConnection()
        gw.pump.flush()
        self.assertEqual(gw.stats.egress.open_count(CLIENT), 1)
        fourth = gw.open(host="d.example")
        self.assertEqual(fourth.data, b"")  # resolving, not refused
        self.assertIn("d.example", gw.resolver.pending)

    def test_quota_exceeded(self):
        """A client over its quota is refused."""
        gw = Gateway(quota=100)
        gw.hello()
        gw.policy.quota.account(CLIENT).add(101, gw.reactor.seconds())
        self.assertEqual(
            answer(gw.open(host="93.184.216.34"))["reason"], "quota_exceeded"
        )


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = Gateway(quota=10**6)
        self.gw.hello()

    def connected(self, kind=StringTransport):
        collector = self.gw.open(encode_request("93.184.216.34", 25) + b"EHLO me\r\n")
        transport, protocol = self.gw.succeed(kind=kind)
        return collector, transport, protocol

    def test_relays_and_counts(self):
        """ok with the bound address, bytes both ways, counted and charged."""
        collector, transport, protocol = self.connected()
        self.assertEqual(answer(collector), {"ok": True, "bound": "203.0.113.1:40312"})
        self.assertEqual(transport.value(), b"EHLO me\r\n")
        protocol.dataReceived(b"250 hello\r\n")
        self.gw.pump.flush()
        self.assertEqual(collector.data.partition(b"\n")[2], b"250 hello\r\n")
        traffic = self.gw.traffic
        self.assertEqual((traffic.bytes_sent, traffic.bytes_received), (9, 11))
        self.assertEqual(traffic.connected, 1)
        self.assertEqual(self.gw.policy.quota.account(CLIENT).used, 20)
        view = self.gw.policy.client_view(CLIENT)["Egress"]
        self.assertEqual(
            {k: v for k, v in view.items() if k != "Refused"},
            {
                "Requests": 1,
                "Connections": 1,
                "Open": 1,
                "SentBytes": 9,
                "ReceivedBytes": 11,
            },
        )
        self.assertEqual(set(view["Refused"]), {r.value for r in EgressRefusal})

    def test_name_connects_to_the_checked_address(self):
        """A name's forbidden addresses are skipped; the allowed one is dialed
        by IP (no second lookup)."""
        self.gw.open(host="mx.example")
        self.gw.resolver.answer("mx.example", ["127.0.0.1", "93.184.216.34"])
        self.gw.pump.flush()
        host, port, _ = self.gw.connection()
        self.assertEqual((host, port), ("93.184.216.34", 25))
        self.assertEqual(len(self.gw.reactor.tcpClients), 1)

    def test_next_address_after_a_failure(self):
        """The next allowed address is tried when one fails."""
        collector = self.gw.open(host="mx.example")
        self.gw.resolver.answer("mx.example", ["93.184.216.34", "93.184.216.35"])
        self.gw.pump.flush()
        self.gw.fail(ConnectionRefusedError())
        self.assertEqual(self.gw.connection()[0], "93.184.216.35")
        self.gw.succeed()
        self.assertTrue(answer(collector)["ok"])

    def test_destination_vanishes(self):
        """The destination's connection is lost: the stream is reset."""
        collector, transport, protocol = self.connected()
        protocol.connectionLost(Failure(ConnectionLost()))
        self.gw.pump.flush()
        self.assertIsNotNone(collector.lost)
        self.assertTrue(collector.lost.check(ConnectionLost), collector.lost)
        self.assertEqual(self.gw.traffic.open, 0)
        self.assertFalse(self.gw.client.closed)

    def test_client_vanishes(self):
        """The client resets the stream: the destination is aborted."""
        collector, transport, protocol = self.connected()
        collector.transport.abortConnection()
        self.gw.pump.flush()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.gw.traffic.open, 0)

    def test_session_ends(self):
        """The whole session goes: the destination is closed, counts settle."""
        collector, transport, protocol = self.connected()
        self.gw.client.transport.loseConnection()
        self.gw.pump.flush()
        self.assertTrue(transport.disconnecting)

    def test_client_gone_while_resolving(self):
        """The stream ends during the lookup: nothing refused, nothing dialed."""
        collector = self.gw.open(host="mx.example")
        collector.transport.abortConnection()
        self.gw.pump.flush()
        self.assertEqual(self.gw.traffic.refused, {})
        self.assertEqual(self.gw.traffic.open, 0)
        self.gw.resolver.answer("mx.example", ["93.184.216.34"])
        self.assertEqual(self.gw.reactor.tcpClients, [])

    def test_client_gone_while_dialing_the_first_of_two(self):
        """The stream ends while dialing: the next address is not tried, and
        the cancelled attempt is no refusal."""
        collector = self.gw.open(host="mx.example")
        self.gw.resolver.answer("mx.example", ["93.184.216.34", "93.184.216.35"])
        self.gw.pump.flush()
        collector.transport.abortConnection()
        self.gw.pump.flush()
        self.assertEqual(len(self.gw.reactor.tcpClients), 1)
        self.assertEqual(self.gw.traffic.refused, {})

    def test_client_gone_while_connecting(self):
        """The stream ends while connecting: the attempt is cancelled."""
        collector = self.gw.open(host="93.184.216.34")
        collector.transport.abortConnection()
        self.gw.pump.flush()
        self.assertEqual(self.gw.traffic.open, 0)
        self.assertEqual(list(self.gw.session.streams), [1])

    def test_half_close(self):
        """The client's EOF reaches the destination as a half-close."""
        collector, transport, protocol = self.connected(HalfClosing)
        collector.transport.loseWriteConnection()
        self.gw.pump.flush()
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"221 bye\r\n")
        self.gw.pump.flush()
        self.assertTrue(collector.data.endswith(b"221 bye\r\n"))

    def test_phases(self):
        """The stream's phase moves request, resolving, connecting, relaying."""
        self.gw.open(host="mx.example")
        control = self.gw.session.handler
        stream = [s for s in self.gw.session.streams.values() if s.id != 1][0]
        self.assertIs(stream.protocol.phase, EgressPhase.RESOLVING)
        self.gw.resolver.answer("mx.example", ["93.184.216.34"])
        self.gw.pump.flush()
        self.assertIs(stream.protocol.phase, EgressPhase.CONNECTING)
        self.gw.succeed()
        self.assertIs(stream.protocol.phase, EgressPhase.RELAYING)
        self.assertIs(control.state.value, "accepted")


class ChargeTests(SynchronousTestCase):
    """Egress bytes are charged to the client's quota and bandwidth."""

    def relay(self, **limits):
        gw = Gateway(limits=limits, quota=limits.pop("quota_bytes", 0))
        gw.hello()
        collector = gw.open(host="93.184.216.34")
        transport, protocol = gw.succeed()
        return gw, collector, transport, protocol

    def test_quota_cut(self):
        """Over quota with "cut": the running egress connection is cut."""
        gw, collector, transport, protocol = self.relay(
            quota_bytes=100, quota_exceeded_action="cut"
        )
        protocol.dataReceived(b"x" * 50)
        gw.pump.flush()
        self.assertIsNone(collector.lost)
        protocol.dataReceived(b"x" * 60)
        gw.pump.flush()
        self.assertIsNotNone(collector.lost)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(
            answer(gw.open(host="93.184.216.34"))["reason"], "quota_exceeded"
        )

    def test_quota_refuse_new(self):
        """Over quota with "refuse-new": the running one goes on."""
        gw, collector, transport, protocol = self.relay(quota_bytes=100)
        protocol.dataReceived(b"x" * 150)
        gw.pump.flush()
        self.assertIsNone(collector.lost)
        self.assertTrue(collector.data.endswith(b"x" * 150))

    def test_bandwidth(self):
        """Bytes from the destination draw from the client's upload bucket:
        past the burst the destination is paused, then resumed."""
        gw, collector, transport, protocol = self.relay(
            bandwidth=1000, bandwidth_burst=1000
        )
        protocol.dataReceived(b"x" * 3000)
        gw.pump.flush()
        self.assertEqual(transport.producerState, "paused")
        gw.reactor.advance(3)
        gw.pump.flush()
        self.assertEqual(transport.producerState, "producing")
        upload, download = gw.policy.bandwidth.client_buckets[CLIENT]
        self.assertGreater(upload.limited_seconds(), 0)
