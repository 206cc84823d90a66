"""A UDP flow's client process killed mid-flow: real processes, real sockets.

The client runs under twistd and dies by SIGKILL while a flow is busy. The
gateway must end that flow (its session is gone), count it, lose nothing
else, and serve the next datagram from the same user address through the
other client of the tunnel.
"""

from __future__ import annotations

import os
import signal

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.faultkit import TWISTD, TwistdProcess
from tests.support import Deployment, wait_until
from tests.udpkit import UdpEcho, UdpUser, free_udp_port
from threshold.server.stats import UdpFlowEnd

FIRST, SECOND = "TestClient1", "TestClient2"


class UdpClientKilledTests(TestCase):
    timeout = 60

    def setUp(self):
        if not os.path.exists(TWISTD):
            self.skipTest(f"no {TWISTD}")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def client(self, deployment, client_id, echo_port):
        process = TwistdProcess(
            "threshold-client",
            {
                "ClientId": client_id,
                "ServerHost": "127.0.0.1",
                "ServerTunnelControlPort": deployment.control_port,
                "UseTls": False,
                "ServiceToLocalAddrMap": {"game": f"127.0.0.1:{echo_port}"},
                "KeepaliveIntervalSeconds": 0.5,
                "KeepaliveTimeoutSeconds": 2.0,
                "ReconnectInitialDelaySeconds": 0.05,
                "ReconnectMaxDelaySeconds": 0.5,
            },
            self.dir,
            client_id,
        )
        self.addCleanup(process.kill)
        process.start()
        return process

    def echo(self, prefix):
        echo = UdpEcho(prefix)
        port = echo.start()
        self.addCleanup(echo.stop)
        return port

    @inlineCallbacks
    def test_client_killed_mid_flow_fails_over(self):
        deployment = Deployment(
            False, self.dir, keepalive_interval_seconds=0.5, keepalive_timeout_seconds=2
        )
        self.addCleanup(deployment.stop)
        deployment.start_server()
        first = self.client(deployment, FIRST, self.echo(b"1:"))
        self.client(deployment, SECOND, self.echo(b"2:"))
        yield deployment.wait_connected(FIRST, 15)
        yield deployment.wait_connected(SECOND, 15)
        port = free_udp_port()
        code, body = yield deployment.put_tunnels(
            [
                {
                    "ClientIds": [FIRST, SECOND],
                    "ListenAddress": "127.0.0.1",
                    "ListenPort": port,
                    "BackEndService": "game",
                    "Protocol": "udp",
                }
            ]
        )
        self.assertEqual(code, 200, body)
        user = UdpUser().start(port)
        self.addCleanup(user.stop)
        for n in range(50):
            user.send(b"%d" % n)
        yield wait_until(lambda: len(user.answers) == 50, 10, "the first client")
        self.assertEqual(set(user.answers), {b"1:%d" % n for n in range(50)})
        udp = deployment.server.stats.udp

        first.signal(signal.SIGKILL)
        self.assertEqual((yield first.wait(5)), -signal.SIGKILL)
        yield wait_until(
            lambda: udp.flows_ended[UdpFlowEnd.STREAM_ENDED] == 1,
            5,
            "the flow to end with its session",
        )
        self.assertEqual(udp.flows_open, 0)
        user.send(b"after")
        yield wait_until(lambda: b"2:after" in user.answers, 10, "the other client")
        self.assertEqual(udp.flows_opened, 2)
        self.assertEqual(len(user.answers), 51)
