"""UDP tunnels end to end: real gateway, real client, real UDP peers on loopback.

A DNS query by dnspython to a twisted.names server behind the tunnel,
thousands of datagrams checked one by one, many flows at once (each its
own socket on the client), a flow timing out and reopening, PROXY v2
DGRAM headers read by the independent proxy-protocol package, failover
to another client, and the refusals (unknown service, flow caps,
oversize) counted.
"""

from __future__ import annotations

import os
import struct

import dns.message
import dns.query
import dns.rdatatype
from proxyprotocol.v2 import ProxyProtocolV2
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import Deployment, tunnel, wait_until
from tests.test_proxy_protocol_e2e import ipv6_loopback
from tests.udpkit import (
    DNS_ADDRESS,
    DNS_NAME,
    UdpEcho,
    UdpUser,
    free_udp_port,
    start_dns,
)
from threshold.config.policy import ClientPolicy
from threshold.server import metrics
from threshold.server.stats import Refusal, UdpDrop, UdpFlowEnd

CLIENT = "TestClient1"
OTHER = "TestClient2"


def udp_tunnel(port: int, service: str, **more: object) -> dict[str, object]:
    return tunnel(CLIENT, port, service, Protocol="udp", **more)


class UdpTunnelTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def deploy(self, services, tunnels, clients=(CLIENT,), **server_fields):
        self.deployment = Deployment(False, self.mktemp(), **server_fields)
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        for client_id in clients:
            self.deployment.start_client(client_id, services)
            yield self.deployment.wait_connected(client_id)
        code, body = yield self.deployment.put_tunnels(tunnels)
        self.assertEqual(code, 200, body)
        return body

    def user(self, port: int) -> UdpUser:
        user = UdpUser().start(port)
        self.addCleanup(user.stop)
        return user

    def echo(self, prefix: bytes = b"") -> tuple[UdpEcho, int]:
        echo = UdpEcho(prefix)
        port = echo.start()
        self.addCleanup(echo.stop)
        return echo, port

    @property
    def udp(self):
        return self.deployment.server.stats.udp

    @inlineCallbacks
    def test_dns_query_through_the_tunnel(self):
        """dnspython asks a twisted.names server behind the tunnel and gets its A."""
        dns_port, port_number = start_dns()
        self.addCleanup(dns_port.stopListening)
        port = free_udp_port()
        body = yield self.deploy(
            {"dns": ("127.0.0.1", port_number)}, [udp_tunnel(port, "dns")]
        )
        self.assertEqual(body[0]["Protocol"], "udp")
        query = dns.message.make_query(DNS_NAME.decode(), dns.rdatatype.A)
        answer = yield deferToThread(
            dns.query.udp, query, "127.0.0.1", timeout=5, port=port
        )
        [rrset] = answer.answer
        self.assertEqual([r.address for r in rrset], [DNS_ADDRESS])
        self.assertEqual(answer.id, query.id)
        self.assertEqual(self.udp.flows_opened, 1)
        self.assertEqual((self.udp.datagrams_in, self.udp.datagrams_out), (1, 1))
        text = metrics.render(metrics.server_registry(self.deployment.server)).decode()
        self.assertIn("threshold_udp_flows_opened_total 1.0", text)

    @inlineCallbacks
    def test_thousands_of_datagrams_checked_one_by_one(self):
        """3000 datagrams of varied sizes come back whole, in content and number."""
        echo, echo_port = self.echo(b"re:")
        port = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)}, [udp_tunnel(port, "echo")]
        )
        user = self.user(port)
        sent = {}
        total, window = 3000, 100
        for start in range(0, total, window):
            for seq in range(start, start + window):
                payload = struct.pack("!I", seq) + os.urandom(seq % 1200)
                sent[seq] = payload
                user.send(payload)
            yield wait_until(
                lambda start=start: len(user.answers) >= start + window,
                10,
                f"answers up to {start + window}",
            )
        self.assertEqual(len(user.answers), total)
        seen = set()
        for answer in user.answers:
            self.assertTrue(answer.startswith(b"re:"))
            (seq,) = struct.unpack("!I", answer[3:7])
            self.assertEqual(answer[3:], sent[seq], f"datagram {seq} changed")
            seen.add(seq)
        self.assertEqual(seen, set(range(total)))
        # The service got each datagram whole, from one flow socket.
        self.assertEqual(sorted(d for d, _ in echo.received), sorted(sent.values()))
        self.assertEqual(len(echo.sources()), 1)
        self.assertEqual(self.udp.flows_opened, 1)
        self.assertEqual(sum(self.udp.dropped.values()), 0)
        traffic = self.deployment.server.stats.tunnels[("127.0.0.1", port, "udp:*")]
        self.assertEqual(traffic.bytes_in, sum(len(p) for p in sent.values()))
        self.assertEqual(traffic.bytes_out, traffic.bytes_in + 3 * total)

    @inlineCallbacks
    def test_many_flows_at_once(self):
        """40 users at once: each its own flow and client socket, its own answers."""
        echo, echo_port = self.echo()
        port = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)}, [udp_tunnel(port, "echo")]
        )
        users = [self.user(port) for _ in range(40)]
        for round_ in range(10):
            for index, user in enumerate(users):
                user.send(b"user %d round %d" % (index, round_))
            yield wait_until(
                lambda r=round_: all(len(u.answers) == r + 1 for u in users),
                10,
                f"every answer of round {round_}",
            )
        for index, user in enumerate(users):
            self.assertEqual(
                sorted(user.answers),
                sorted(b"user %d round %d" % (index, r) for r in range(10)),
            )
        self.assertEqual(len(echo.sources()), 40)
        self.assertEqual(self.udp.flows_open, 40)
        self.assertEqual(self.udp.flows_opened, 40)

    @inlineCallbacks
    def test_flow_times_out_and_reopens(self):
        """An idle flow ends (its client socket closes); the next datagram opens one."""
        echo, echo_port = self.echo()
        port = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [udp_tunnel(port, "echo", UdpFlowIdleSeconds=0.3)],
        )
        user = self.user(port)
        user.send(b"one")
        yield wait_until(lambda: user.answers == [b"one"], 10, "first answer")
        yield wait_until(
            lambda: self.udp.flows_ended[UdpFlowEnd.IDLE] == 1, 10, "idle end"
        )
        self.assertEqual(self.udp.flows_open, 0)
        user.send(b"two")
        yield wait_until(lambda: user.answers == [b"one", b"two"], 10, "second")
        self.assertEqual(self.udp.flows_opened, 2)
        # A new flow is a new socket on the client: a new source port.
        self.assertEqual(len(echo.sources()), 2)

    @inlineCallbacks
    def test_proxy_v2_dgram_header_in_front_of_each_datagram(self):
        """The service gets the user's address in a PROXY v2 DGRAM header, each time."""
        echo = UdpEcho(answer=False)
        echo_port = echo.start()
        self.addCleanup(echo.stop)
        port = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [
                udp_tunnel(
                    port,
                    "echo",
                    HaProxyProxyProtocol=True,
                    HaProxyProxyProtocolVersion=2,
                )
            ],
        )
        user = self.user(port)
        for n in range(3):
            user.send(b"datagram %d" % n)
        yield wait_until(lambda: len(echo.received) == 3, 10, "three datagrams")
        for n, (data, _) in enumerate(echo.received):
            length = 16 + int.from_bytes(data[14:16], "big")
            header, rest = data[:length], data[length:]
            result = ProxyProtocolV2().unpack(header)
            self.assertEqual(result.protocol, 2)  # socket.SOCK_DGRAM
            self.assertEqual((str(result.source[0]), result.source[1]), user.address)
            self.assertEqual((str(result.dest[0]), result.dest[1]), ("127.0.0.1", port))
            self.assertEqual(rest, b"datagram %d" % n)

    @inlineCallbacks
    def test_failover_opens_the_next_flow_on_the_other_client(self):
        """The flow's client goes away: the next datagram is served by the other."""
        first, first_port = self.echo(b"first:")
        second, second_port = self.echo(b"second:")
        port = free_udp_port()
        self.deployment = Deployment(False, self.mktemp())
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.deployment.start_client(CLIENT, {"echo": ("127.0.0.1", first_port)})
        self.deployment.start_client(OTHER, {"echo": ("127.0.0.1", second_port)})
        yield self.deployment.wait_connected(CLIENT)
        yield self.deployment.wait_connected(OTHER)
        code, body = yield self.deployment.put_tunnels(
            [
                {
                    "ClientIds": [CLIENT, OTHER],
                    "ListenAddress": "127.0.0.1",
                    "ListenPort": port,
                    "BackEndService": "echo",
                    "Protocol": "udp",
                }
            ]
        )
        self.assertEqual(code, 200, body)
        user = self.user(port)
        user.send(b"a")
        yield wait_until(lambda: user.answers == [b"first:a"], 10, "first")
        yield self.deployment.stop_client(CLIENT)
        yield wait_until(
            lambda: self.udp.flows_ended[UdpFlowEnd.STREAM_ENDED] == 1, 10, "end"
        )
        user.send(b"b")
        yield wait_until(lambda: user.answers[-1:] == [b"second:b"], 10, "second")
        self.assertEqual(self.udp.flows_opened, 2)

    @inlineCallbacks
    def test_unknown_service_ends_the_flow(self):
        """A client without the service resets the stream: counted, nothing else hit."""
        echo, echo_port = self.echo()
        port = free_udp_port()
        other = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [udp_tunnel(port, "nothere"), udp_tunnel(other, "echo")],
        )
        lost = self.user(port)
        lost.send(b"x")
        yield wait_until(
            lambda: self.udp.flows_ended[UdpFlowEnd.STREAM_ENDED] == 1, 10, "reset"
        )
        fine = self.user(other)
        fine.send(b"y")
        yield wait_until(lambda: fine.answers == [b"y"], 10, "the other tunnel")
        self.assertEqual(lost.answers, [])
        self.assertEqual(self.udp.flows_open, 1)

    @inlineCallbacks
    def test_flow_caps_and_oversize(self):
        """Past UdpMaxFlowsPerSourceIp a new flow is dropped; oversize is dropped."""
        echo, echo_port = self.echo()
        port = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [udp_tunnel(port, "echo")],
            udp_max_flows_per_source_ip=2,
            udp_max_datagram_bytes=100,
        )
        users = [self.user(port) for _ in range(3)]
        for user in users[:2]:
            user.send(b"in")
        yield wait_until(lambda: all(u.answers for u in users[:2]), 10, "two flows")
        users[2].send(b"over")
        users[0].send(b"z" * 101)
        users[0].send(b"z" * 100)
        yield wait_until(lambda: len(users[0].answers) == 2, 10, "100 bytes pass")
        self.assertEqual(users[0].answers[-1], b"z" * 100)
        self.assertEqual(users[2].answers, [])
        stats = self.deployment.server.stats
        self.assertEqual(stats.refused[Refusal.LIMIT_UDP_FLOWS_SOURCE_IP], 1)
        self.assertEqual(self.udp.dropped[UdpDrop.FLOW_REFUSED], 1)
        self.assertEqual(self.udp.dropped[UdpDrop.OVERSIZE], 1)
        text = metrics.render(metrics.server_registry(self.deployment.server)).decode()
        self.assertIn(
            'threshold_udp_datagrams_dropped_total{reason="oversize"} 1.0', text
        )
        self.assertIn(
            "threshold_public_connections_refused_total"
            '{reason="limit_udp_flows_source_ip"} 1.0',
            text,
        )

    @inlineCallbacks
    def test_tcp_and_udp_tunnels_share_a_port(self):
        """A TCP and a UDP tunnel on one address and port: both serve."""
        echo, echo_port = self.echo()
        port = free_udp_port()
        body = yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [udp_tunnel(port, "echo"), tunnel(CLIENT, port, "echo")],
        )
        self.assertEqual([t["Protocol"] for t in body], ["udp", "tcp"])
        user = self.user(port)
        user.send(b"hello")
        yield wait_until(lambda: user.answers == [b"hello"], 10, "answer")
        server = self.deployment.server
        self.assertIsNotNone(server.routes.listening_port(("127.0.0.1", port)))
        self.assertIsNotNone(server.routes.udp_port(("127.0.0.1", port)))
        code, status = yield self.deployment.get_json("/tunnels/status")
        self.assertEqual(code, 200)
        self.assertEqual(
            [(t["Protocol"], t["Serving"]) for t in status["Tunnels"]],
            [("udp", [CLIENT]), ("tcp", [CLIENT])],
        )

    @inlineCallbacks
    def test_window_full_drops_whole_datagrams(self):
        """A stream held back (bandwidth) fills: answers are dropped, never cut.

        The tunnel's 40 kB/s download pauses the flow's stream at the
        gateway, its window runs out, and the client drops what does not
        fit (UDP semantics) instead of buffering 1.2 MB.
        """
        echo, echo_port = self.echo(b"a" * 30000)
        port = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [udp_tunnel(port, "echo", BandwidthBytesPerSecond=40000)],
        )
        user = self.user(port)
        for seq in range(40):
            user.send(b"%02d" % seq)
        yield wait_until(lambda: len(echo.received) == 40, 10, "the service")
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertGreater(len(user.answers), 0)
        self.assertLess(len(user.answers), 40)
        for answer in user.answers:
            self.assertEqual(len(answer), 30002)
            self.assertEqual(answer[:30000], b"a" * 30000)
        seqs = [int(a[30000:]) for a in user.answers]
        self.assertEqual(seqs, sorted(seqs))

    @inlineCallbacks
    def test_source_policy_applies(self):
        """DenySourceCidrs refuses a UDP user before any stream is opened."""
        echo, echo_port = self.echo()
        port = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [udp_tunnel(port, "echo", DenySourceCidrs=["127.0.0.0/8"])],
        )
        user = self.user(port)
        user.send(b"q")
        stats = self.deployment.server.stats
        yield wait_until(
            lambda: stats.refused[Refusal.DENIED_SOURCE] == 1, 10, "refusal"
        )
        self.assertEqual(self.udp.dropped[UdpDrop.FLOW_REFUSED], 1)
        self.assertEqual(self.udp.flows_opened, 0)
        self.assertEqual(echo.received, [])

    @inlineCallbacks
    def test_quota_counts_datagrams_and_cuts_the_flow(self):
        """Datagram bytes count in the client's quota; "cut" ends the flow."""
        echo, echo_port = self.echo()
        port = free_udp_port()
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [udp_tunnel(port, "echo")],
            client_policies={
                CLIENT: ClientPolicy(quota_bytes=10_000, quota_exceeded_action="cut")
            },
        )
        user = self.user(port)
        for _ in range(4):
            user.send(b"q" * 1000)
        yield wait_until(lambda: len(user.answers) == 4, 10, "within quota")
        user.send(b"q" * 3000)
        yield wait_until(
            lambda: self.udp.flows_ended[UdpFlowEnd.QUOTA_CUT] == 1, 10, "the cut"
        )
        stats = self.deployment.server.stats
        user.send(b"after")
        yield wait_until(
            lambda: stats.refused[Refusal.QUOTA_EXCEEDED] == 1, 10, "refused"
        )
        account = self.deployment.server.policy.quota.account(CLIENT)
        self.assertGreaterEqual(account.used, 10_000)
        self.assertEqual(self.udp.flows_open, 0)

    @inlineCallbacks
    def test_ipv6_user_gets_a_udp6_proxy_header(self):
        """A UDP tunnel on ::1: the service sees the user's IPv6 address (UDP6)."""
        if not ipv6_loopback():
            raise SkipTest("no IPv6 loopback on this host")
        echo = UdpEcho(answer=False)
        echo_port = echo.start()
        self.addCleanup(echo.stop)
        port = free_udp_port("::1")
        yield self.deploy(
            {"echo": ("127.0.0.1", echo_port)},
            [
                udp_tunnel(
                    port,
                    "echo",
                    ListenAddress="::1",
                    HaProxyProxyProtocol=True,
                    HaProxyProxyProtocolVersion=2,
                )
            ],
        )
        user = UdpUser().start(port, "::1")
        self.addCleanup(user.stop)
        user.send(b"six")
        yield wait_until(lambda: len(echo.received) == 1, 10, "the datagram")
        data = echo.received[0][0]
        length = 16 + int.from_bytes(data[14:16], "big")
        result = ProxyProtocolV2().unpack(data[:length])
        self.assertEqual(data[13], 0x22)  # UDP6
        self.assertEqual((str(result.source[0]), result.source[1]), user.address[:2])
        self.assertEqual((str(result.dest[0]), result.dest[1]), ("::1", port))
        self.assertEqual(data[length:], b"six")
