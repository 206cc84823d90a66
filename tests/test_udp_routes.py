"""UDP tunnels in the tunnel schema and the route table's all-or-nothing apply."""

from __future__ import annotations

import errno

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.udpkit import free_udp_port
from threshold.server.routes import RouteTable, TunnelError, parse_tunnels
from threshold.server.stats import GatewayStats
from threshold.server.udp import UdpFrontends, UdpLimits


class FakePort:
    def __init__(self, log, what):
        self.log, self.what = log, what

    def stopListening(self):  # noqa: N802
        self.log.append(("stop", *self.what))
        return succeed(None)


def entry(port, proto="tcp", **more):
    body = {"ClientId": "a", "ListenAddress": "127.0.0.1", "ListenPort": port}
    body.update(BackEndService="svc", Protocol=proto, **more)
    return body


class SchemaTests(SynchronousTestCase):
    def refused(self, body):
        with self.assertRaises(TunnelError) as caught:
            parse_tunnels(body)
        return caught.exception

    def test_protocol_defaults_to_tcp_and_is_written_back(self):
        [tcp, udp] = parse_tunnels([entry(1), entry(1, "udp", UdpFlowIdleSeconds=25)])
        self.assertEqual(tcp.to_json()["Protocol"], "tcp")
        self.assertEqual(udp.to_json()["Protocol"], "udp")
        self.assertEqual(udp.to_json()["UdpFlowIdleSeconds"], 25)
        self.assertEqual(parse_tunnels([udp.to_json()]), [udp])
        self.assertNotEqual(tcp.key, udp.key)

    def test_conflicts_refused_with_the_field_named(self):
        cases = [
            ([entry(1, "UDP")], "Protocol"),
            ([entry(1, "udp", ListenHostnameGlob="a.example")], "ListenHostnameGlob"),
            (
                [entry(1, "udp", HaProxyProxyProtocol=True)],
                "HaProxyProxyProtocolVersion",
            ),
            ([entry(1, UdpFlowIdleSeconds=5)], "UdpFlowIdleSeconds"),
            ([entry(1, "udp", UdpFlowIdleSeconds=0)], "UdpFlowIdleSeconds"),
            ([entry(1, "udp"), entry(1, "udp")], "ListenPort"),
        ]
        for body, field in cases:
            error = self.refused(body)
            self.assertEqual((error.status, error.field), (400, field), error.message)

    def test_two_udp_tunnels_named(self):
        error = self.refused([entry(1, "udp"), entry(1, "udp")])
        self.assertIn("both UDP tunnels on 127.0.0.1:1", error.message)
        self.assertEqual(error.index, 1)


class RouteTableTests(SynchronousTestCase):
    def setUp(self):
        self.log = []
        self.busy_udp = set()

        def listen(host, port, factory):
            self.log.append(("tcp", host, port))
            return succeed(FakePort(self.log, ("tcp", host, port)))

        def listen_udp(host, port, key):
            if port in self.busy_udp:
                raise CannotListenError(host, port, OSError(errno.EADDRINUSE, "busy"))
            self.log.append(("udp", host, port))
            return FakePort(self.log, ("udp", host, port))

        self.table = RouteTable(listen, lambda key: None, listen_udp=listen_udp)

    def apply(self, body):
        return self.successResultOf(self.table.apply(parse_tunnels(body)))

    def test_tcp_and_udp_on_one_port_are_two_sockets(self):
        self.apply([entry(53), entry(53, "udp")])
        self.assertEqual(self.log, [("tcp", "127.0.0.1", 53), ("udp", "127.0.0.1", 53)])
        key = ("127.0.0.1", 53)
        self.assertEqual([t.protocol for t in self.table.group(key)], ["tcp"])
        self.assertEqual(self.table.udp_tunnel(key).protocol, "udp")
        self.assertIsNotNone(self.table.udp_port(key))

    def test_udp_bind_failure_leaves_the_old_set_untouched(self):
        """A busy UDP port: 409 naming it, the TCP socket opened meanwhile closed."""
        self.apply([entry(1, "udp")])
        self.busy_udp.add(2)
        failure = self.failureResultOf(
            self.table.apply(
                parse_tunnels([entry(1, "udp"), entry(3), entry(2, "udp")])
            )
        )
        error = failure.value
        self.assertEqual(
            (error.status, error.index, error.field), (409, 2, "ListenPort")
        )
        self.assertIn("UDP address 127.0.0.1:2 already in use", error.message)
        self.assertIn(("stop", "tcp", "127.0.0.1", 3), self.log)
        self.assertEqual([t.listen_port for t in self.table.tunnels()], [1])
        self.assertNotIn(("stop", "udp", "127.0.0.1", 1), self.log)

    def test_save_failure_closes_the_new_udp_socket(self):
        """The set cannot be saved: the UDP socket opened for it is closed."""

        def persist(tunnels):
            raise TunnelError(503, "not applied: cannot save")

        self.apply([entry(1)])
        failure = self.failureResultOf(
            self.table.apply(parse_tunnels([entry(1), entry(2, "udp")]), persist)
        )
        self.assertEqual(failure.value.status, 503)
        self.assertIn(("stop", "udp", "127.0.0.1", 2), self.log)
        self.assertIsNone(self.table.udp_port(("127.0.0.1", 2)))
        self.assertEqual([t.listen_port for t in self.table.tunnels()], [1])

    def test_unchanged_udp_socket_kept_removed_closed(self):
        self.apply([entry(1, "udp"), entry(2, "udp")])
        self.apply([entry(1, "udp", UdpFlowIdleSeconds=5)])
        self.assertEqual(self.log.count(("udp", "127.0.0.1", 1)), 1)
        self.assertIn(("stop", "udp", "127.0.0.1", 2), self.log)
        self.assertIsNone(self.table.udp_port(("127.0.0.1", 2)))

    def test_restore_leaves_out_what_cannot_bind(self):
        self.busy_udp.add(2)
        failed = self.successResultOf(
            self.table.restore(
                parse_tunnels([entry(1, "udp"), entry(2, "udp"), entry(2)])
            )
        )
        self.assertEqual([(n.index, n.error.status) for n in failed], [(1, 409)])
        self.assertEqual(
            [t.key for t in self.table.tunnels()],
            [("127.0.0.1", 1, "udp:*"), ("127.0.0.1", 2, "*")],
        )

    def test_close_stops_udp_sockets(self):
        self.apply([entry(1, "udp")])
        self.successResultOf(self.table.close())
        self.assertIn(("stop", "udp", "127.0.0.1", 1), self.log)

    def test_without_udp_support_refused(self):
        table = RouteTable(lambda *a: succeed(None), lambda key: None)
        error = self.failureResultOf(
            table.apply(parse_tunnels([entry(1, "udp")]))
        ).value
        self.assertEqual((error.status, error.field), (400, "Protocol"))


class RealSocketTests(TestCase):
    """UdpFrontends.listen on real loopback sockets."""

    def listen(self, owner, port):
        listening = owner.listen("127.0.0.1", port, ("127.0.0.1", port))
        self.addCleanup(listening.stopListening)
        return listening

    def owner(self, **limits):
        return UdpFrontends(
            reactor, reactor, None, None, GatewayStats(), UdpLimits(**limits)
        )

    def test_port_taken_is_cannot_listen(self):
        port = free_udp_port()
        self.listen(self.owner(), port)
        with self.assertRaises(CannotListenError):
            self.owner().listen("127.0.0.1", port, ("127.0.0.1", port))

    def test_reuse_port_shares_it(self):
        """With ReusePort two gateways on one host bind the same UDP port."""
        port = free_udp_port()
        first = self.listen(self.owner(reuse_port=True), port)
        second = self.listen(self.owner(reuse_port=True), port)
        self.assertEqual(first.getHost().port, second.getHost().port)
        with self.assertRaises(CannotListenError):
            self.owner().listen("127.0.0.1", port, ("127.0.0.1", port))
