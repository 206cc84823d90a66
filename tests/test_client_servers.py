"""A client of several real gateways in-process, over TLS on loopback.

One client process (its service tree, built from a config) with
``Servers`` naming three gateways: two whose certificate is valid for the
name the entry uses, and one whose is not (refused by TLS while the others
serve). Health checks on a listening and a closed port reach every
gateway; one gateway is stopped and started again while the other keeps
its session and its users.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from tests.test_client_admin import curl_unix
from threshold.config.client import HealthCheck, ServerEntry
from threshold.tap.client import build_client

CLIENT = "TestClient1"


class SeveralGatewaysTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def echo_through(self, deployment: Deployment, port: int, data: bytes):
        code, answer = yield deployment.put_tunnels([tunnel(CLIENT, port, "web")])
        self.assertEqual(code, 200, answer)
        user = yield connect_user(port)
        user.transport.write(data)
        user.transport.loseWriteConnection()
        yield user.done
        self.assertEqual(user.data, data)

    def health_at(self, deployment: Deployment):
        record = deployment.server.registry.record(CLIENT)
        if record is None:
            return None
        return record.health, record.health_detail

    @inlineCallbacks
    def test_sessions_to_each_gateway(self):
        """Each gateway gets a session and the health; one restarts alone."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        backend = Backend(echo=True)
        web_port = yield backend.start()
        self.addCleanup(backend.stop)
        closed_port = free_port()
        first = Deployment(True, self.mktemp())
        second = Deployment(True, self.mktemp())
        # Its certificate names localhost, 127.0.0.1 and ::1, not 127.0.0.2.
        wrong_name = Deployment(True, self.mktemp(), listen_address="127.0.0.2")
        for deployment in (first, second, wrong_name):
            self.addCleanup(deployment.stop)
            deployment.start_server()
        sock = os.path.join(folder, "admin.sock")
        config = first.client_config(
            CLIENT,
            {"web": ("127.0.0.1", web_port), "db": ("127.0.0.1", closed_port)},
            server_host=None,
            servers=(
                ServerEntry(host="127.0.0.1", tunnel_control_port=first.control_port),
                ServerEntry(host="localhost", tunnel_control_port=second.control_port),
                ServerEntry(
                    host="127.0.0.2", tunnel_control_port=wrong_name.control_port
                ),
            ),
            health_checks={
                "web": HealthCheck(interval_seconds=1, timeout_seconds=1),
                "db": HealthCheck(interval_seconds=1, timeout_seconds=1),
            },
            admin_socket=sock,
        )
        client = build_client(config, reactor)
        client.startService()
        self.addCleanup(client.stopService)
        yield first.wait_connected(CLIENT)
        yield second.wait_connected(CLIENT)

        expected = (
            {"web": True, "db": False},
            {"db": f"connection refused at 127.0.0.1:{closed_port}"},
        )
        for deployment in (first, second):
            yield wait_until(
                lambda d=deployment: self.health_at(d) == expected,
                10,
                "the health at each gateway",
            )
        self.assertFalse(wrong_name.server.registry.is_connected(CLIENT))

        wrong = f"127.0.0.2:{wrong_name.control_port}"
        for _ in range(50):
            result = yield curl_unix(sock, "/status")
            status = json.loads(result.stdout)
            sessions = {s["Gateway"]: s for s in status["Sessions"]}
            if sessions[wrong]["LastError"] is not None:
                break
        self.assertEqual(
            list(sessions),
            [
                f"127.0.0.1:{first.control_port}",
                f"localhost:{second.control_port}",
                f"127.0.0.2:{wrong_name.control_port}",
            ],
        )
        self.assertEqual(
            [s["State"] for s in sessions.values()][:2], ["connected", "connected"]
        )
        # Refused by TLS: the certificate is not valid for that entry's Host.
        refused = sessions[wrong]
        self.assertIn(refused["State"], ("connecting", "waiting"))
        self.assertIn("IPAddressMismatch", refused["LastError"])
        self.assertIsNone(refused["RttMilliseconds"])
        self.assertEqual(status["HealthChecks"]["db"]["State"], "unhealthy")
        self.assertEqual(status["HealthChecks"]["web"]["State"], "healthy")

        yield self.echo_through(first, free_port(), b"via the first")
        yield self.echo_through(second, free_port(), b"via the second")

        # The first gateway stops (Go Away to its sessions) and comes back;
        # the second keeps its session and its users meanwhile.
        kept = second.server.registry.session_for(CLIENT)
        yield first.stop_server()
        yield self.echo_through(second, free_port(), b"still served")
        first.start_server()
        yield first.wait_connected(CLIENT)
        yield wait_until(
            lambda: self.health_at(first) == expected, 10, "health after restart"
        )
        self.assertIs(second.server.registry.session_for(CLIENT), kept)
        yield self.echo_through(first, free_port(), b"back")
