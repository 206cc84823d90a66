"""The gateway's UDP flow table, on a Clock with stand-in sessions and socket.

Opening (one write: header, PROXY header, first datagram), routing by user
address, idle expiry and reopening, the window-full drop, the caps, the
refusals and what a client that vanishes does to its flow.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import MessageLengthError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.session import SessionClosed, StreamLimitReached
from threshold.server.stats import GatewayStats, Limit, Refusal, UdpDrop, UdpFlowEnd
from threshold.server.tunnels import parse_tunnels
from threshold.server.udp import UdpFrontend, UdpFrontends, UdpLimits
from threshold.server.udpflow import MAX_QUEUED
from threshold.wire import datagram
from threshold.wire.handshake import LineBuffer, parse_stream_header

KEY = ("127.0.0.1", 5353)
DEFAULT = UdpLimits(idle=30.0)
USER = ("192.0.2.7", 40000)


class FakeStream:
    def __init__(self, session, stream_id, protocol):
        self.session = session
        self.id = stream_id
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.unsent = 0
        self.closed = False
        self.how: str | None = None

    def buffered(self):
        return self.unsent, 0

    def write(self, data):
        self.writes.append(data)

    def _end(self, how):
        if not self.closed:
            self.closed, self.how = True, how
            self.protocol.connectionLost(Failure(Exception(how)))

    def loseConnection(self):  # noqa: N802
        self._end("fin")

    def abortConnection(self):  # noqa: N802
        self._end("rst")

    def sent(self) -> bytes:
        return b"".join(self.writes)


class FakeSession:
    name = "session"

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.streams: list[FakeStream] = []

    def open_stream(self, protocol):
        if self.fail is not None:
            raise self.fail
        stream = FakeStream(self, 2 * len(self.streams) + 2, protocol)
        self.streams.append(stream)
        protocol.makeConnection(stream)
        return stream


class FakeClients:
    def __init__(self, **sessions):
        self.sessions = sessions
        self.order = list(sessions)

    def candidates(self, tunnel):
        return [c for c in self.order if c in self.sessions]

    def session_for(self, client_id):
        return self.sessions.get(client_id)


class FakeRoutes:
    def __init__(self, tunnel):
        self.tunnel = tunnel

    def udp_tunnel(self, key):
        return self.tunnel if key == KEY else None


class FakeSocket:
    def __init__(self):
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.fail: Exception | None = None

    def write(self, data, addr):
        if self.fail is not None:
            raise self.fail
        self.sent.append((data, addr))

    def getHost(self):  # noqa: N802
        return IPv4Address("UDP", *KEY)


def make_tunnel(**more):
    entry = {
        "ClientIds": ["a", "b"],
        "ListenAddress": KEY[0],
        "ListenPort": KEY[1],
        "BackEndService": "dns",
        "Protocol": "udp",
    }
    entry.update(more)
    return parse_tunnels([entry])[0]


def split_opening(data: bytes):
    """The header line and the framed records after it."""
    line, rest = LineBuffer().feed(data)
    return parse_stream_header(line), datagram.DatagramDecoder().feed(rest)


class FlowTableTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.stats = GatewayStats()
        self.sessions = {"a": FakeSession(), "b": FakeSession()}
        self.clients = FakeClients(**self.sessions)

    def frontend(self, limits=DEFAULT, **tunnel_fields):
        self.tunnel = make_tunnel(**tunnel_fields)
        owner = UdpFrontends(
            None, self.clock, FakeRoutes(self.tunnel), self.clients, self.stats, limits
        )
        frontend = owner.frontends[KEY] = UdpFrontend(owner, KEY)
        self.socket = FakeSocket()
        frontend.makeConnection(self.socket)
        return frontend

    def test_first_datagram_opens_a_flow_in_one_write(self):
        """Header line and first datagram go out together, no round trip."""
        frontend = self.frontend()
        frontend.datagramReceived(b"query", USER)
        [stream] = self.sessions["a"].streams
        self.assertEqual(len(stream.writes), 1)
        header, records = split_opening(stream.writes[0])
        self.assertEqual(
            (header.service, header.proto, header.proxy_v2), ("dns", "udp", False)
        )
        self.assertEqual(records, [b"query"])
        self.assertEqual(self.stats.udp.flows_open, 1)
        self.assertEqual(self.stats.tunnels[self.tunnel.key].bytes_in, 5)

    def test_proxy_header_is_the_first_record(self):
        frontend = self.frontend(
            HaProxyProxyProtocol=True, HaProxyProxyProtocolVersion=2
        )
        frontend.datagramReceived(b"q", USER)
        header, records = split_opening(self.sessions["a"].streams[0].writes[0])
        self.assertTrue(header.proxy_v2)
        self.assertEqual(records[0], datagram.build_proxy_v2_dgram(USER, KEY))
        self.assertEqual(records[1:], [b"q"])

    def test_each_address_is_a_flow(self):
        frontend = self.frontend()
        frontend.datagramReceived(b"1", USER)
        frontend.datagramReceived(b"2", USER)
        frontend.datagramReceived(b"3", ("192.0.2.7", 40001))
        first, second = self.sessions["a"].streams
        self.assertEqual(first.writes[1], datagram.encode(b"2"))
        self.assertEqual(split_opening(second.writes[0])[1], [b"3"])
        self.assertEqual(self.stats.udp.datagrams_in, 3)

    def test_answers_go_back_whole_to_the_user(self):
        """The client's framing, fed a byte at a time, makes whole datagrams."""
        frontend = self.frontend()
        frontend.datagramReceived(b"q", USER)
        stream = self.sessions["a"].streams[0]
        framed = (
            datagram.encode(b"answer one")
            + datagram.encode(b"")
            + datagram.encode(b"2")
        )
        for i in range(len(framed)):
            stream.protocol.dataReceived(framed[i : i + 1])
        self.assertEqual(
            self.socket.sent, [(b"answer one", USER), (b"", USER), (b"2", USER)]
        )
        self.assertEqual(self.stats.udp.datagrams_out, 3)
        self.assertEqual(self.stats.tunnels[self.tunnel.key].bytes_out, 11)

    def test_idle_flow_ends_and_the_next_datagram_reopens(self):
        """UdpFlowIdleSeconds without traffic: FIN, counted; traffic resets it."""
        frontend = self.frontend(UdpFlowIdleSeconds=10)
        frontend.datagramReceived(b"q", USER)
        stream = self.sessions["a"].streams[0]
        self.clock.advance(9)
        stream.protocol.dataReceived(datagram.encode(b"a"))  # an answer: not idle
        self.clock.advance(9)
        self.assertFalse(stream.closed)
        self.clock.advance(1)
        self.assertEqual(stream.how, "fin")
        self.assertEqual(self.stats.udp.flows_ended[UdpFlowEnd.IDLE], 1)
        self.assertEqual((self.stats.udp.flows_open, frontend.flows), (0, {}))
        frontend.datagramReceived(b"again", USER)
        self.assertEqual(len(self.sessions["a"].streams), 2)
        self.assertEqual(self.stats.udp.flows_opened, 2)

    def test_gateway_default_idle(self):
        frontend = self.frontend(UdpLimits(idle=30.0))
        frontend.datagramReceived(b"q", USER)
        self.clock.advance(29.9)
        self.assertEqual(self.stats.udp.flows_open, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.stats.udp.flows_open, 0)

    def test_window_full_drops_never_buffers(self):
        """With MAX_QUEUED bytes unsent, a datagram is dropped and counted."""
        frontend = self.frontend()
        frontend.datagramReceived(b"q", USER)
        stream = self.sessions["a"].streams[0]
        stream.unsent = MAX_QUEUED - 10
        frontend.datagramReceived(b"x" * 11, USER)
        frontend.datagramReceived(b"y" * 8, USER)
        self.assertEqual(stream.writes[1:], [datagram.encode(b"y" * 8)])
        self.assertEqual(self.stats.udp.dropped[UdpDrop.WINDOW_FULL], 1)
        self.assertEqual(self.stats.tunnels[self.tunnel.key].bytes_in, 9)

    def test_oversize_dropped_both_ways(self):
        frontend = self.frontend(UdpLimits(max_datagram=100))
        frontend.datagramReceived(b"x" * 101, USER)
        self.assertEqual(self.sessions["a"].streams, [])
        frontend.datagramReceived(b"x" * 100, USER)
        stream = self.sessions["a"].streams[0]
        stream.protocol.dataReceived(
            datagram.encode(b"z" * 101) + datagram.encode(b"ok")
        )
        self.assertEqual(self.socket.sent, [(b"ok", USER)])
        self.assertEqual(self.stats.udp.dropped[UdpDrop.OVERSIZE], 2)

    def test_flow_caps(self):
        """Per source and per tunnel; a flow that ends gives its slot back."""
        frontend = self.frontend(UdpLimits(max_per_source=2, max_per_tunnel=3))
        for port in (1, 2, 3):
            frontend.datagramReceived(b"q", ("192.0.2.7", port))
        self.assertEqual(self.stats.refused[Refusal.LIMIT_UDP_FLOWS_SOURCE_IP], 1)
        self.assertEqual(self.stats.limits_hit[Limit.UDP_FLOWS_PER_SOURCE_IP], 1)
        frontend.datagramReceived(b"q", ("192.0.2.8", 1))
        frontend.datagramReceived(b"q", ("192.0.2.9", 1))
        self.assertEqual(self.stats.refused[Refusal.LIMIT_UDP_FLOWS_TUNNEL], 1)
        self.assertEqual(self.stats.udp.dropped[UdpDrop.FLOW_REFUSED], 2)
        self.assertEqual(self.stats.udp.flows_open, 3)
        self.sessions["a"].streams[0].abortConnection()
        frontend.datagramReceived(b"q", ("192.0.2.7", 3))
        self.assertEqual(self.stats.udp.flows_open, 3)
        self.assertEqual(frontend.owner.source_flows("192.0.2.7"), 2)

    def test_client_vanishing_ends_the_flow_then_failover(self):
        """The stream is lost: the next datagram opens a flow on the other client."""
        frontend = self.frontend()
        frontend.datagramReceived(b"1", USER)
        del self.clients.sessions["a"]
        self.sessions["a"].streams[0].protocol.connectionLost(
            Failure(SessionClosed("x"))
        )
        self.assertEqual(self.stats.udp.flows_ended[UdpFlowEnd.STREAM_ENDED], 1)
        frontend.datagramReceived(b"2", USER)
        [stream] = self.sessions["b"].streams
        self.assertEqual(split_opening(stream.writes[0])[1], [b"2"])
        self.assertEqual(self.stats.clients["b"].accepted, 1)

    def test_stream_cut_inside_a_datagram_is_malformed(self):
        frontend = self.frontend()
        frontend.datagramReceived(b"1", USER)
        stream = self.sessions["a"].streams[0]
        stream.protocol.dataReceived(b"\x00\x09abc")
        stream.abortConnection()
        self.assertEqual(self.stats.udp.flows_ended[UdpFlowEnd.MALFORMED], 1)
        self.assertEqual(self.socket.sent, [])

    def test_a_full_session_is_skipped(self):
        self.sessions["a"].fail = StreamLimitReached("full")
        frontend = self.frontend()
        frontend.datagramReceived(b"1", USER)
        self.assertEqual(len(self.sessions["b"].streams), 1)
        self.assertEqual(self.stats.limits_hit[Limit.STREAMS_PER_SESSION], 1)
        self.assertEqual(self.stats.clients.get("a"), None)

    def test_no_session_can_open(self):
        for session in self.sessions.values():
            session.fail = SessionClosed("closing")
        frontend = self.frontend()
        frontend.datagramReceived(b"1", USER)
        self.assertEqual(self.stats.refused[Refusal.NO_HEALTHY_CLIENT], 1)
        self.assertEqual(frontend.owner.source_flows("192.0.2.7"), 0)

    def test_no_healthy_client_and_no_route(self):
        frontend = self.frontend()
        self.clients.sessions.clear()
        frontend.datagramReceived(b"1", USER)
        self.assertEqual(self.stats.refused[Refusal.NO_HEALTHY_CLIENT], 1)
        frontend.owner.routes.tunnel = None
        frontend.datagramReceived(b"1", USER)
        self.assertEqual(self.stats.refused[Refusal.NO_ROUTE], 1)
        self.assertEqual(self.stats.udp.dropped[UdpDrop.FLOW_REFUSED], 2)

    def test_closing_the_socket_ends_its_flows(self):
        frontend = self.frontend()
        frontend.datagramReceived(b"1", USER)
        frontend.doStop()
        self.assertEqual(self.stats.udp.flows_ended[UdpFlowEnd.CLOSED], 1)
        self.assertEqual(self.sessions["a"].streams[0].how, "fin")
        self.assertEqual(self.stats.udp.flows_open, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_send_failure_to_the_user_counted(self):
        """A socket error sending to the user drops that datagram only."""
        frontend = self.frontend()
        frontend.datagramReceived(b"q", USER)
        stream = self.sessions["a"].streams[0]
        for error in (OSError(105, "no buffer space"), MessageLengthError("long")):
            self.socket.fail = error
            stream.protocol.dataReceived(datagram.encode(b"lost"))
        self.socket.fail = None
        stream.protocol.dataReceived(datagram.encode(b"kept"))
        self.assertEqual(self.socket.sent, [(b"kept", USER)])
        self.assertEqual(self.stats.udp.dropped[UdpDrop.SEND_FAILED], 2)
        self.assertEqual(self.stats.udp.flows_open, 1)
