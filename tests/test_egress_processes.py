"""Egress with a real gateway and a real client process (twistd), killed mid-stream.

The destination and the SOCKS5 program are in the test's process: the
destination sends a chunk every few milliseconds for as long as it is
connected, so a connection is always mid-stream when a process dies.
"""

from __future__ import annotations

import os
import signal

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.faultkit import TwistdProcess, sleep
from tests.support import Recorder, free_port, wait_until

CLIENT = "home-a"


class Ticker(Protocol):
    """A destination that sends 1 KiB every 5 ms until it is disconnected."""

    def __init__(self, live: list) -> None:
        self.live = live
        self.lost = None

    def connectionMade(self) -> None:  # noqa: N802
        self.live.append(self)
        self.loop = task.LoopingCall(self.transport.write, b"t" * 1024)
        self.loop.start(0.005)

    def connectionLost(self, reason) -> None:  # noqa: N802
        self.lost = reason
        if self.loop.running:
            self.loop.stop()


def connect_request(port: int) -> bytes:
    return b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big")


class ProcessTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def setUp(self):
        self.tickers: list[Ticker] = []
        self.destination = yield TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1"
        ).listen(Factory.forProtocol(lambda: Ticker(self.tickers)))
        self.addCleanup(self.destination.stopListening)
        self.destination_port = self.destination.getHost().port
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        control = free_port()
        self.socks_port = free_port()
        self.gateway = TwistdProcess(
            "threshold-server",
            {
                "UseTls": False,
                "ListenAddress": "127.0.0.1",
                "TunnelControlPort": control,
                "ManagementPort": free_port(),
                "EgressPolicy": {
                    CLIENT: [
                        {"Cidr": "127.0.0.1/32", "Ports": str(self.destination_port)}
                    ]
                },
            },
            directory,
            "gateway",
        )
        self.client = TwistdProcess(
            "threshold-client",
            {
                "ClientId": CLIENT,
                "ServerHost": "127.0.0.1",
                "ServerTunnelControlPort": control,
                "UseTls": False,
                "ServiceToLocalAddrMap": {},
                "ReconnectInitialDelaySeconds": 0.1,
                "ReconnectMaxDelaySeconds": 0.5,
                "Egress": {"SocksListen": f"127.0.0.1:{self.socks_port}"},
            },
            directory,
            "client",
        )
        for process in (self.gateway, self.client):
            process.start()
            self.addCleanup(process.kill)
        self.program = yield self.connected_program()

    @inlineCallbacks
    def connected_program(self):
        """A SOCKS5 program relaying from the destination (retried until the
        client is up and connected to the gateway)."""
        for _ in range(300):
            program = Recorder()
            try:
                yield connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", self.socks_port), program
                )
            except Exception:
                yield sleep(0.05)
                continue
            program.transport.write(connect_request(self.destination_port))
            yield wait_until(
                lambda p=program: len(p.data) >= 4 or p.done.called, 10, "a reply"
            )
            if program.data[:4] == b"\x05\x00\x05\x00":
                return program
            program.transport.abortConnection()
            yield sleep(0.05)
        raise AssertionError(
            f"no egress connection\n{self.client.log_tail()}\n{self.gateway.log_tail()}"
        )

    @inlineCallbacks
    def test_client_killed(self):
        """SIGKILL the client mid-stream: the gateway drops the destination."""
        yield wait_until(lambda: len(self.program.data) > 20_000, 10, "bytes")
        self.assertEqual(len(self.tickers), 1)
        self.assertIsNone(self.tickers[0].lost)
        self.client.signal(signal.SIGKILL)
        yield wait_until(
            lambda: self.tickers[0].lost is not None, 10, "destination cut"
        )
        yield self.program.done

    @inlineCallbacks
    def test_gateway_killed(self):
        """SIGKILL the gateway mid-stream: the program's connection ends, and
        the destination's (the kernel closes the gateway's sockets)."""
        yield wait_until(lambda: len(self.program.data) > 4096, 10, "bytes")
        self.gateway.signal(signal.SIGKILL)
        yield self.program.done
        yield wait_until(
            lambda: self.tickers[0].lost is not None, 10, "destination cut"
        )
