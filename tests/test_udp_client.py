"""The client's side of UDP flows: a real session in memory, a stand-in UDP socket.

The header's ``proto`` hands the stream to the UDP flow; each framed
datagram reaches the service whole, from the flow's own socket, with the
PROXY header in front when asked; answers come back framed, and are
dropped (counted) when the stream is full. Bad input resets the stream.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.clientkit import connect
from threshold.client.udp import MAX_QUEUED
from threshold.mux.stream import StreamReset
from threshold.testing import Collector
from threshold.wire import datagram
from threshold.wire.handshake import PROTO_UDP, encode_stream_header

SERVICES = {"dns": ("127.0.0.1", 5353), "named": ("dns.internal", 53)}


class FakePort:
    def __init__(self, protocol, interface):
        self.protocol = protocol
        self.interface = interface
        self.connected: tuple[str, int] | None = None
        self.sent: list[bytes] = []
        self.stopped = False
        self.fail: Exception | None = None

    def connect(self, host, port):
        self.connected = (host, port)

    def write(self, data):
        if self.fail is not None:
            raise self.fail
        self.sent.append(data)

    def stopListening(self):  # noqa: N802
        self.stopped = True


class FakeUdpReactor:
    def __init__(self):
        self.ports: list[FakePort] = []
        self.fail: Exception | None = None

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):  # noqa: N802, N803
        if self.fail is not None:
            raise self.fail
        fake = FakePort(protocol, interface)
        protocol.makeConnection(fake)
        self.ports.append(fake)
        return fake


class UdpClientTests(SynchronousTestCase):
    def setUp(self):
        self.udp = FakeUdpReactor()
        self.c = connect(services=SERVICES, udp_reactor=self.udp)

    def open_flow(self, service="dns", proxy=False, first=b"", pause=False):
        user = Collector(pause_on_connect=pause)
        stream = self.c.server.open_stream(user)
        stream.write(encode_stream_header(service, PROTO_UDP, proxy_v2=proxy) + first)
        self.c.pump.flush()
        return user, stream

    def test_each_flow_has_its_own_connected_socket(self):
        self.open_flow(first=datagram.encode(b"q1"))
        self.open_flow(first=datagram.encode(b"q2"))
        first, second = self.udp.ports
        self.assertEqual(first.connected, ("127.0.0.1", 5353))
        self.assertEqual(second.connected, ("127.0.0.1", 5353))
        self.assertEqual((first.sent, second.sent), ([b"q1"], [b"q2"]))
        self.assertEqual(self.c.settings.stats.udp_flows, 2)

    def test_datagrams_whole_whatever_the_chunking(self):
        _, stream = self.open_flow()
        framed = b"".join(datagram.encode(b"d%d" % n) for n in range(20))
        for i in range(0, len(framed), 3):
            stream.write(framed[i : i + 3])
            self.c.pump.flush()
        self.assertEqual(self.udp.ports[0].sent, [b"d%d" % n for n in range(20)])

    def test_answers_come_back_framed(self):
        user, _ = self.open_flow(first=datagram.encode(b"q"))
        port = self.udp.ports[0]
        port.protocol.datagramReceived(b"answer", ("127.0.0.1", 5353))
        port.protocol.datagramReceived(b"", ("127.0.0.1", 5353))
        self.c.pump.flush()
        self.assertEqual(user.data, datagram.encode(b"answer") + datagram.encode(b""))

    def test_proxy_header_in_front_of_each_datagram(self):
        header = datagram.build_proxy_v2_dgram(("192.0.2.7", 4000), ("0.0.0.0", 53))
        self.open_flow(
            proxy=True,
            first=datagram.encode(header)
            + datagram.encode(b"one")
            + datagram.encode(b"two"),
        )
        self.assertEqual(self.udp.ports[0].sent, [header + b"one", header + b"two"])

    def test_bad_proxy_header_resets(self):
        user, _ = self.open_flow(proxy=True, first=datagram.encode(b"PROXY TCP4 x"))
        user.lost.trap(StreamReset)
        self.assertTrue(self.udp.ports[0].stopped)
        self.assertEqual(self.udp.ports[0].sent, [])

    def test_window_full_drops_answers(self):
        """The gateway reads nothing: past window and MAX_QUEUED, answers drop."""
        user, stream = self.open_flow(pause=True)
        port = self.udp.ports[0]
        answer = b"a" * 60000
        for _ in range(12):
            port.protocol.datagramReceived(answer, ("127.0.0.1", 5353))
        self.c.pump.flush()
        dropped = self.c.settings.stats.udp_dropped["window_full"]
        self.assertGreater(dropped, 0)
        client_stream = self.c.session.streams[stream.id]
        self.assertLessEqual(client_stream.buffered()[0], MAX_QUEUED)
        # What got through is whole datagrams only.
        stream.resumeProducing()
        self.c.pump.flush()
        got = datagram.DatagramDecoder().feed(user.data)
        self.assertEqual(got, [answer] * (12 - dropped))
        self.assertEqual(datagram.DatagramDecoder().feed(user.data[-5:]), [])

    def test_oversize_for_the_service_dropped(self):
        header = datagram.build_proxy_v2_dgram(("192.0.2.7", 4000), ("0.0.0.0", 53))
        self.open_flow(
            proxy=True,
            first=datagram.encode(header) + datagram.encode(b"x" * 65500),
        )
        self.assertEqual(self.udp.ports[0].sent, [])
        self.assertEqual(self.c.settings.stats.udp_dropped["oversize"], 1)

    def test_send_failure_counted_flow_kept(self):
        """A refused or failed send drops that datagram only."""
        _, stream = self.open_flow()
        port = self.udp.ports[0]
        port.protocol.connectionRefused()
        port.fail = OSError("no buffer space")
        stream.write(datagram.encode(b"lost"))
        self.c.pump.flush()
        port.fail = None
        stream.write(datagram.encode(b"kept"))
        self.c.pump.flush()
        self.assertEqual(self.c.settings.stats.udp_dropped["send_failed"], 2)
        self.assertEqual(port.sent, [b"kept"])
        self.assertFalse(port.stopped)

    def test_host_name_refused_cleanly(self):
        """A UDP service must map to an IP address: the stream is reset."""
        user, _ = self.open_flow("named", first=datagram.encode(b"q"))
        user.lost.trap(StreamReset)
        self.assertEqual(self.udp.ports, [])

    def test_unknown_service_reset(self):
        user, _ = self.open_flow("nothere")
        user.lost.trap(StreamReset)
        self.assertEqual(self.c.settings.stats.unknown_service, 1)
        self.assertEqual(self.udp.ports, [])

    def test_gateway_fin_closes_the_socket(self):
        user, stream = self.open_flow(first=datagram.encode(b"q"))
        stream.loseConnection()
        self.c.pump.flush()
        self.assertTrue(self.udp.ports[0].stopped)
        self.assertEqual(user.data, b"")

    def test_session_lost_closes_every_socket(self):
        self.open_flow()
        self.open_flow()
        self.c.session.transport.loseConnection()
        self.c.pump.flush()
        self.assertTrue(all(p.stopped for p in self.udp.ports))

    def test_no_socket_for_the_flow_resets(self):
        """Out of file descriptors: that flow's stream is reset, counted."""
        self.udp.fail = OSError(24, "Too many open files")
        user, _ = self.open_flow(first=datagram.encode(b"q"))
        user.lost.trap(StreamReset)
        self.assertEqual(self.c.settings.stats.local_failures, 1)
        self.udp.fail = None
        self.open_flow(first=datagram.encode(b"again"))
        self.assertEqual(self.udp.ports[0].sent, [b"again"])
