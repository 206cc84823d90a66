"""The client's SOCKS5 proxy in memory: a fake program, a session to a fake gateway.

The program's side is a ``StringTransport``; the gateway's side is the
accepting end of an in-memory session whose streams the test answers.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.clientkit import make_settings
from threshold.client.gateway import GatewayLink, LinkState
from threshold.client.socks import SocksFactory, SocksPhase, pick_gateway
from threshold.client.socks_codec import REPLY_FOR_REFUSAL, Reply, encode_reply
from threshold.testing import Collector, connected_sessions
from threshold.wire.egress import EgressRefusal, encode_answer, encode_refusal

GREETING = b"\x05\x01\x00"
#: CONNECT to mx.example:25.
CONNECT_NAME = b"\x05\x01\x00\x03" + bytes([10]) + b"mx.example" + b"\x00\x19"


class _Held:
    """What a link keeps of a session (a ClientSession's ``session``)."""

    def __init__(self, session) -> None:
        self.session = session


class Setup:
    """One gateway link with a live in-memory session, and the proxy."""

    def __init__(self, accept=True, links: int = 1) -> None:
        self.clock = Clock()
        self.settings = make_settings(clock=self.clock)
        self.gateway_streams: list[Collector] = []
        self.links = []
        self.pumps = []
        for i in range(links):
            client, _server, pump = connected_sessions(
                accept_on_server=self._accept if accept else (lambda s: None),
                clock=self.clock,
            )
            link = GatewayLink(f"gw{i}:9056", self.clock)
            link.connecting()
            link.attached(_Held(client))
            link.accepted(f"gw{i}")
            self.links.append(link)
            self.pumps.append(pump)
        self.factory = SocksFactory(self.settings, self.links)

    def _accept(self, stream) -> Collector:
        collector = Collector()
        self.gateway_streams.append(collector)
        return collector

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def program(self) -> tuple[object, StringTransport]:
        """A local program connected to the proxy."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def ask(self, data: bytes = GREETING + CONNECT_NAME):
        protocol, transport = self.program()
        protocol.dataReceived(data)
        self.flush()
        return protocol, transport

    def answer(self, line: bytes, index: int = -1) -> None:
        self.gateway_streams[index].transport.write(line)
        self.flush()


def reply_of(transport: StringTransport) -> bytes:
    """The SOCKS reply after the method selection (10 bytes for IPv4)."""
    value = transport.value()
    assert value[:2] == b"\x05\x00", value
    return value[2:12]


class ConnectTests(SynchronousTestCase):
    def test_success_and_relay(self):
        """Request line on an odd stream; ok becomes 05 00 with the bound
        address; bytes relayed both ways."""
        setup = Setup()
        protocol, transport = setup.ask(GREETING + CONNECT_NAME + b"EHLO me\r\n")
        stream = setup.gateway_streams[0]
        self.assertEqual(stream.transport.id % 2, 1)
        line, _, rest = stream.data.partition(b"\n")
        self.assertEqual(json.loads(line), {"connect": "mx.example:25"})
        self.assertEqual(rest, b"")  # held until the gateway answers
        self.assertIs(protocol.phase, SocksPhase.OPENING)
        setup.answer(encode_answer("203.0.113.1", 40312) + b"220 mx ready\r\n")
        self.assertEqual(
            reply_of(transport), encode_reply(Reply.SUCCEEDED, "203.0.113.1", 40312)
        )
        self.assertEqual(transport.value()[12:], b"220 mx ready\r\n")
        self.assertTrue(stream.data.endswith(b"EHLO me\r\n"))
        protocol.dataReceived(b"QUIT\r\n")
        setup.flush()
        self.assertTrue(stream.data.endswith(b"QUIT\r\n"))
        self.assertIs(protocol.phase, SocksPhase.RELAYING)
        self.assertEqual(setup.settings.stats.egress_connections, 1)

    def test_refusals_map_to_reply_codes(self):
        """Each reason the gateway gives becomes its reply code; closed."""
        for reason in EgressRefusal:
            setup = Setup()
            protocol, transport = setup.ask()
            setup.answer(encode_refusal(reason, "why"))
            self.assertEqual(reply_of(transport)[1], REPLY_FOR_REFUSAL[reason], reason)
            self.assertTrue(transport.disconnecting)
            self.assertIs(protocol.phase, SocksPhase.FAILED)
        self.assertEqual(
            REPLY_FOR_REFUSAL[EgressRefusal.NOT_ALLOWED], Reply.NOT_ALLOWED
        )
        self.assertEqual(REPLY_FOR_REFUSAL[EgressRefusal.TIMEOUT], Reply.TTL_EXPIRED)

    def test_bad_answer(self):
        """A malformed answer: general failure, the stream reset."""
        setup = Setup()
        protocol, transport = setup.ask()
        setup.answer(b"garbage\n")
        self.assertEqual(reply_of(transport)[1], Reply.GENERAL_FAILURE)
        self.assertIsNotNone(setup.gateway_streams[0].lost)

    def test_gateway_without_egress(self):
        """A gateway that resets odd streams (an older one): general failure."""
        setup = Setup(accept=False)
        protocol, transport = setup.ask()
        self.assertEqual(reply_of(transport)[1], Reply.GENERAL_FAILURE)
        self.assertTrue(transport.disconnecting)

    def test_gateway_closes_without_answer(self):
        """The stream closed with no answer: general failure."""
        setup = Setup()
        protocol, transport = setup.ask()
        setup.gateway_streams[0].transport.loseConnection()
        setup.flush()
        self.assertEqual(reply_of(transport)[1], Reply.GENERAL_FAILURE)

    def test_no_answer_in_time(self):
        """No answer within 2 x ConnectTimeoutSeconds: TTL expired, stream reset."""
        setup = Setup()
        protocol, transport = setup.ask()
        setup.clock.advance(2 * setup.settings.hello_timeout - 0.1)
        self.assertEqual(transport.value(), b"\x05\x00")
        setup.clock.advance(0.2)
        setup.flush()
        self.assertEqual(reply_of(transport)[1], Reply.TTL_EXPIRED)
        self.assertIsNotNone(setup.gateway_streams[0].lost)

    def test_silent_program(self):
        """A program that never sends its request is cut at the same bound."""
        setup = Setup()
        protocol, transport = setup.program()
        setup.clock.advance(2 * setup.settings.hello_timeout)
        self.assertTrue(transport.disconnecting)

    def test_program_leaves_while_opening(self):
        """The program closes before the answer: the stream is reset."""
        setup = Setup()
        protocol, transport = setup.ask()
        protocol.connectionLost(None)
        setup.flush()
        self.assertIsNotNone(setup.gateway_streams[0].lost)
        self.assertIs(protocol.phase, SocksPhase.CLOSED)

    def test_program_leaves_while_relaying(self):
        """The program's connection is lost mid-stream: the stream ends too."""
        setup = Setup()
        protocol, transport = setup.ask()
        setup.answer(encode_answer("203.0.113.1", 1))
        protocol.connectionLost(Failure(ConnectionLost()))
        setup.flush()
        self.assertIsNotNone(setup.gateway_streams[0].lost)

    def test_not_socks5(self):
        """A SOCKS4 greeting: closed with no reply, no stream opened."""
        setup = Setup()
        protocol, transport = setup.ask(b"\x04\x01\x00\x19\x7f\x00\x00\x01\x00")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(setup.gateway_streams, [])

    def test_unsupported_command(self):
        """BIND: 07, no stream opened."""
        setup = Setup()
        protocol, transport = setup.ask(
            GREETING + b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x19"
        )
        self.assertEqual(reply_of(transport)[1], Reply.COMMAND_NOT_SUPPORTED)
        self.assertEqual(setup.gateway_streams, [])
        self.assertEqual(setup.settings.stats.egress_refused, 1)


class GatewayChoiceTests(SynchronousTestCase):
    def test_no_gateway_connected(self):
        """No connected gateway: network unreachable."""
        setup = Setup()
        setup.links[0].failed("down")
        protocol, transport = setup.ask()
        self.assertEqual(reply_of(transport)[1], Reply.NETWORK_UNREACHABLE)

    def test_first_connected_in_order(self):
        """The first connected gateway of Servers is used; draining ones are not."""
        setup = Setup(links=2)
        self.assertIs(pick_gateway(setup.links)[0], setup.links[0])
        setup.links[0].draining()
        self.assertIs(setup.links[0].state, LinkState.DRAINING)
        self.assertIs(pick_gateway(setup.links)[0], setup.links[1])
        protocol, transport = setup.ask()
        self.assertEqual(protocol.gateway, setup.links[1])
        self.assertEqual(len(setup.gateway_streams), 1)
