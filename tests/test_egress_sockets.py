"""Egress on real sockets with a SOCKS5 client written here: IPv6, a server
that speaks first, a megabyte each way, either end vanishing mid-stream."""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from tests.support import Deployment, Recorder, free_port, wait_until
from threshold.config.egress import EGRESS_POLICY, EgressSettings

CLIENT = "home-a"


class Backend6:
    """Recorders on [::1]."""

    def __init__(self, **recorder) -> None:
        self.connections: list[Recorder] = []
        self.recorder = recorder

    @inlineCallbacks
    def start(self):
        def build() -> Recorder:
            r = Recorder(**self.recorder)
            self.connections.append(r)
            return r

        self.port = yield TCP6ServerEndpoint(reactor, 0, interface="::1").listen(
            Factory.forProtocol(build)
        )
        return self.port.getHost().port


def socks_connect_v6(port: int) -> bytes:
    """Greeting and a CONNECT to [::1]:port."""
    address = socket.inet_pton(socket.AF_INET6, "::1")
    return b"\x05\x01\x00" + b"\x05\x01\x00\x04" + address + port.to_bytes(2, "big")


class SocketTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.echo = Backend6(echo=True, greeting=b"220 ready\r\n")
        self.echo_port = yield self.echo.start()
        self.addCleanup(self.echo.port.stopListening)
        policy = EGRESS_POLICY.check(
            {CLIENT: [{"Cidr": "::1/128", "Ports": f"{self.echo_port}"}]}
        )
        self.deployment = Deployment(False, self.mktemp(), egress_policy=policy)
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.socks_port = free_port()
        self.deployment.start_client(
            CLIENT,
            {},
            egress=EgressSettings(socks_listen=("127.0.0.1", self.socks_port)),
        )
        yield self.deployment.wait_connected(CLIENT)

    @inlineCallbacks
    def program(self):
        """A SOCKS5 program connected through the proxy to the echo server."""
        user = Recorder()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.socks_port), user
        )
        user.transport.write(socks_connect_v6(self.echo_port))
        # Method choice (2), a reply bound to an IPv6 address (22), the greeting.
        yield wait_until(lambda: len(user.data) >= 2 + 22 + 11, 10, "SOCKS reply")
        self.assertEqual(user.data[:6], b"\x05\x00\x05\x00\x00\x04")
        self.assertEqual(user.data[6:22], socket.inet_pton(socket.AF_INET6, "::1"))
        self.assertEqual(user.data[24:], b"220 ready\r\n")
        user.chunks = []
        return user

    @property
    def egress(self):
        return self.deployment.server.stats.egress.clients[CLIENT]

    @inlineCallbacks
    def test_megabyte_each_way(self):
        """An IPv6 destination that speaks first; 1 MiB echoed back intact."""
        user = yield self.program()
        payload = os.urandom(1 << 20)
        user.transport.write(payload)
        yield wait_until(lambda: len(user.data) >= len(payload), 20, "echo")
        self.assertEqual(user.data, payload)
        user.transport.loseConnection()
        yield wait_until(lambda: self.egress.open == 0, 10, "stream closed")
        self.assertEqual(self.egress.bytes_sent, len(payload))
        self.assertEqual(self.egress.bytes_received, len(payload) + 11)

    @inlineCallbacks
    def test_destination_vanishes(self):
        """The destination aborts mid-stream: the program's connection ends."""
        user = yield self.program()
        destination = self.echo.connections[0]
        destination.transport.abortConnection()
        yield user.done
        yield wait_until(lambda: self.egress.open == 0, 10, "stream closed")
        self.assertTrue(self.deployment.server.registry.is_connected(CLIENT))

    @inlineCallbacks
    def test_program_vanishes(self):
        """The program aborts mid-stream: the destination's connection ends."""
        user = yield self.program()
        destination = self.echo.connections[0]
        user.transport.abortConnection()
        yield destination.done
        yield wait_until(lambda: self.egress.open == 0, 10, "stream closed")
        self.assertTrue(self.deployment.server.registry.is_connected(CLIENT))

    @inlineCallbacks
    def test_half_close(self):
        """The program's EOF reaches the destination; its answer still comes."""
        user = yield self.program()
        user.transport.write(b"QUIT\r\n")
        user.transport.loseWriteConnection()
        yield user.done
        self.assertEqual(user.data, b"QUIT\r\n")
        self.assertTrue(self.echo.connections[0].eof)
