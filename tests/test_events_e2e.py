"""The event stream of a real deployment, read by real SSE clients.

A gateway with TLS on loopback (tests/support.py Deployment); the
``eventsource`` npm package (tests/interop, what Node programs use) follows
``GET /events`` with the operator's certificate while a client connects,
reports a service unhealthy, a PUT is applied and a limit is hit; the
events arrive in order. Its connection is then cut from the server side:
it reconnects by itself with ``Last-Event-ID`` and gets what happened
meanwhile, nothing twice, nothing missed. ``curl -N`` reads the history
with ``?since=``; ``GET /server`` and ``GET /clients`` show the
certificates' end dates.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.certs import test_pki
from tests.components import missing, require_tool
from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from threshold.config.client import HealthCheck
from threshold.keygen import KeyPair, make_client_cert, make_server_cert, write_pair
from threshold.server.events import EventType, StreamNotice
from threshold.server.events_service import EventService

INTEROP = Path(__file__).parent / "interop"
SSE_CLIENT = INTEROP / "sse_client.js"
EVENTSOURCE = INTEROP / "node_modules" / "eventsource" / "package.json"
CLIENT = "TestClient1"
ALL_TYPES = [t.value for t in EventType] + [n.value for n in StreamNotice]


def require_eventsource() -> str:
    """node, with the eventsource package installed (npm ci --prefix tests/interop)."""
    node = require_tool("node")
    if not EVENTSOURCE.exists():
        raise missing("eventsource is not installed: npm ci --prefix tests/interop")
    return node


class Lines(ProcessProtocol):
    """Collects a child's stdout, one JSON object per line."""

    def __init__(self) -> None:
        self.buffer = b""
        self.lines: list[dict[str, Any]] = []
        self.stderr = b""
        self.ended = None

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.lines.append(json.loads(line))

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.stderr += data

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.ended = reason

    def events(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "type" in line]

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["type"] == event_type]


class EventStreamDeploymentTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.node = require_eventsource()
        self.deployment = Deployment(
            True,
            self.mktemp(),
            max_connections_per_tunnel=1,
            event_keepalive_seconds=0.5,
        )
        self.deployment.start_server()
        self.addCleanup(self.deployment.stop)

    def events_service(self) -> EventService:
        assert self.deployment.server_service is not None
        [service] = [
            s for s in self.deployment.server_service if isinstance(s, EventService)
        ]
        return service

    def follow(self) -> Lines:
        """Start the eventsource client on GET /events."""
        pki = self.deployment.pki
        lines = Lines()
        args = [
            self.node,
            str(SSE_CLIENT),
            self.deployment.url("/events"),
            "--ca",
            pki.ca_cert,
            "--cert",
            pki.client_cert("operator"),
            "--key",
            pki.client_key("operator"),
            *ALL_TYPES,
        ]
        env = dict(os.environ, NODE_PATH=str(INTEROP / "node_modules"))
        transport = reactor.spawnProcess(lines, self.node, args, env=env)

        def stop() -> Any:
            if lines.ended is None:
                transport.closeStdin()
                return wait_until(lambda: lines.ended is not None, 10, "node to exit")
            return None

        self.addCleanup(stop)
        return lines

    @inlineCallbacks
    def test_events_in_order_and_resumed_after_a_real_reconnect(self):
        d = self.deployment
        lines = self.follow()
        yield wait_until(lambda: {"state": "open"} in lines.lines, 15, "stream open")
        backend = Backend()
        web_port = yield backend.start()
        self.addCleanup(backend.stop)
        closed_port = free_port()
        d.start_client(
            CLIENT,
            {"web": ("127.0.0.1", web_port), "db": ("127.0.0.1", closed_port)},
            health_checks={
                "db": HealthCheck(interval_seconds=1, timeout_seconds=1),
            },
        )
        yield wait_until(lambda: lines.of_type("client.health"), 15, "health event")
        public = free_port()
        status, _ = yield d.put_tunnels([tunnel(CLIENT, public, "web")])
        self.assertEqual(status, 200)
        yield wait_until(lambda: lines.of_type("tunnels.applied"), 10, "applied")
        # MaxConnectionsPerTunnel is 1: the second user is refused.
        first = yield connect_user(public)
        second = yield connect_user(public)
        yield wait_until(lambda: lines.of_type("limit.hit"), 10, "limit event")
        first.transport.loseConnection()
        second.transport.loseConnection()

        types = [e["type"] for e in lines.events()]
        self.assertEqual(
            types,
            ["client.connected", "client.health", "tunnels.applied", "limit.hit"],
        )
        ids = [int(e["lastEventId"]) for e in lines.events()]
        self.assertEqual(ids, [e["data"]["id"] for e in lines.events()])
        self.assertEqual(ids, sorted(ids))
        connected, health, applied, limit = (e["data"]["data"] for e in lines.events())
        self.assertEqual(connected["ClientId"], CLIENT)
        self.assertIsNotNone(connected["CertificateNotAfter"])
        self.assertEqual(
            health,
            {
                "ClientId": CLIENT,
                "Service": "db",
                "Healthy": False,
                "Detail": f"connection refused at 127.0.0.1:{closed_port}",
            },
        )
        self.assertEqual((applied["Tunnels"], applied["Added"]), (1, 1))
        self.assertEqual(limit["Limit"], "connections_per_tunnel")
        self.assertEqual(limit["Tunnel"], f"127.0.0.1:{public}")
        self.assertEqual(limit["Source"], "127.0.0.1")

        # Cut the stream from the server side; while the reader is away the
        # client leaves. It reconnects by itself with Last-Event-ID.
        service = self.events_service()
        [subscriber] = service.streams.subscribers
        last_before = ids[-1]
        subscriber.request.channel.transport.abortConnection()
        yield wait_until(lambda: not service.streams.subscribers, 10, "stream cut")
        yield d.stop_client(CLIENT)
        # Its only client gone, the tunnel fails over to nobody.
        yield wait_until(lambda: lines.of_type("tunnel.failover"), 15, "replayed")
        self.assertEqual(service.streams.opened, 2)
        [again] = service.streams.subscribers
        self.assertEqual(again.after, last_before)  # it sent Last-Event-ID
        after = lines.events()[4:]
        self.assertEqual(
            [e["type"] for e in after],
            ["client.disconnected", "tunnel.failover"],
            lines.lines,
        )
        self.assertEqual(
            [e["data"]["id"] for e in after], [last_before + 1, last_before + 2]
        )
        self.assertEqual(after[0]["data"]["data"]["State"], "ClientClosed")
        self.assertEqual(
            (after[1]["data"]["data"]["From"], after[1]["data"]["data"]["To"]),
            (CLIENT, None),
        )
        self.assertIn({"state": "error", "status": None}, lines.lines)

        # The gateway stops: the stream ends with stream.closed.
        yield d.stop_server()
        yield wait_until(lambda: lines.of_type("stream.closed"), 10, "stream.closed")
        [closed] = lines.of_type("stream.closed")
        self.assertEqual(closed["data"]["data"]["LastId"], last_before + 2)
        self.assertEqual(closed["lastEventId"], str(last_before + 2))

    @inlineCallbacks
    def test_curl_reads_the_history_with_since(self):
        """curl -N with ?since=0 gets every event kept, as SSE."""
        curl = require_tool("curl")
        d = self.deployment
        backend = Backend()
        web_port = yield backend.start()
        self.addCleanup(backend.stop)
        d.start_client(CLIENT, {"web": ("127.0.0.1", web_port)})
        yield d.wait_connected(CLIENT)
        yield d.put_tunnels([tunnel(CLIENT, free_port(), "web")])
        pki = d.pki
        argv = [
            curl,
            "--silent",
            "-N",
            "--max-time",
            "2",
            "--cacert",
            pki.ca_cert,
            "--cert",
            pki.client_cert("operator"),
            "--key",
            pki.client_key("operator"),
            "--include",
            d.url("/events?since=0&type=client.*,tunnels.*"),
        ]
        result = yield deferToThread(
            subprocess.run, argv, capture_output=True, timeout=20
        )
        self.assertEqual(result.returncode, 28, result.stderr)  # curl's timeout
        head, _, body = result.stdout.decode().partition("\r\n\r\n")
        self.assertIn("content-type: text/event-stream", head.lower())
        self.assertRegex(body, r"id: \d{13,}\nevent: client.connected\ndata: \{")
        self.assertNotIn("stream.reset", body)
        self.assertIn("event: tunnels.applied", body)
        self.assertIn(": keepalive", body)
        # Without a certificate: refused like the rest of the API.
        anonymous = [a for a in argv if a not in ("--cert", "--key")]
        anonymous = [
            a
            for a in anonymous
            if a not in (pki.client_cert("operator"), pki.client_key("operator"))
        ]
        result = yield deferToThread(
            subprocess.run, anonymous, capture_output=True, timeout=20
        )
        self.assertNotIn(b"event:", result.stdout)

    @inlineCallbacks
    def test_certificate_end_dates(self):
        """GET /server and GET /clients show when the certificates end."""
        d = self.deployment
        backend = Backend()
        web_port = yield backend.start()
        self.addCleanup(backend.stop)
        d.start_client(CLIENT, {"web": ("127.0.0.1", web_port)})
        yield d.wait_connected(CLIENT)
        status, server = yield d.get_json("/server")
        self.assertEqual(status, 200)
        self.assertRegex(
            server["CertificateNotAfter"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
        )
        self.assertEqual(server["ManagementPort"], d.management_port)
        self.assertEqual(server["TunnelControlPort"], d.control_port)
        self.assertIsNone(server["GatewayId"])
        self.assertEqual(server["ClientsConnected"], 1)
        self.assertGreaterEqual(server["LastEventId"], 1)
        status, clients = yield d.get_json("/clients")
        self.assertRegex(
            clients[CLIENT]["CertificateNotAfter"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
        )


class CertificateExpiryTests(TestCase):
    """Certificates that end soon, on a real TLS gateway and client."""

    timeout = 60

    @inlineCallbacks
    def test_server_and_client_certificates_announced(self):
        """A gateway certificate ending in 10 days is announced at start, a
        client's ending in 5 at its hello; GET /server shows the end."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        pki = test_pki()
        with open(pki.ca_cert, "rb") as f, open(pki.ca_key, "rb") as g:
            ca = KeyPair(f.read(), g.read())
        files = {}
        for name, pair in (
            ("server", make_server_cert(ca, ["localhost"], ["127.0.0.1"], days=10)),
            ("client", make_client_cert(ca, CLIENT, days=5)),
        ):
            files[name] = (f"{folder}/{name}.crt", f"{folder}/{name}.key")
            write_pair(pair, *files[name])
        d = Deployment(
            True,
            folder,
            server_tls_certificate_file=files["server"][0],
            server_tls_key_file=files["server"][1],
        )
        d.start_server()
        self.addCleanup(d.stop)
        backend = Backend()
        web_port = yield backend.start()
        self.addCleanup(backend.stop)
        d.start_client(
            CLIENT,
            {"web": ("127.0.0.1", web_port)},
            client_tls_certificate_file=files["client"][0],
            client_tls_key_file=files["client"][1],
        )
        yield d.wait_connected(CLIENT)
        [service] = [s for s in d.server_service if isinstance(s, EventService)]
        expiring = [
            e.data
            for e in service.feed.replay(0).events
            if e.type == "certificate.expiring"
        ]
        self.assertEqual([e["Certificate"] for e in expiring], ["server", "client"])
        server, client = expiring
        self.assertEqual(server["Subject"], "CN=localhost")
        self.assertAlmostEqual(server["DaysLeft"], 10, delta=0.1)
        self.assertEqual(client["ClientId"], CLIENT)
        self.assertAlmostEqual(client["DaysLeft"], 5, delta=0.1)
        status, info = yield d.get_json("/server")
        self.assertEqual(info["CertificateNotAfter"], server["NotAfter"])
        status, clients = yield d.get_json("/clients")
        self.assertEqual(clients[CLIENT]["CertificateNotAfter"], client["NotAfter"])
