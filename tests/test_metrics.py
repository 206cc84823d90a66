"""GET /metrics: exact byte counts and the states operators alert on."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families
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


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels), parsed by prometheus-client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class MetricsTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.backend = Backend(echo=True)
        backend_port = yield self.backend.start()
        self.addCleanup(self.backend.stop)
        self.deployment = Deployment(False, self.mktemp())
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        services = {"echo": ("127.0.0.1", backend_port)}
        self.deployment.start_client("TestClient1", services)
        yield self.deployment.wait_connected("TestClient1")
        self.port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient1", self.port, "echo")]
        )
        self.assertEqual(code, 200, body)

    @inlineCallbacks
    def scrape(self):
        response = yield self.deployment.http().get(self.deployment.url("/metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        )
        body = yield response.text()
        return samples(body)

    @inlineCallbacks
    def test_bytes_counted_exactly(self):
        """A known number of bytes each way shows in the tunnel and client counters."""
        sent = [12_345, 1, 700_000]
        for size in sent:
            user = yield connect_user(self.port)
            user.transport.write(os.urandom(size))
            user.transport.loseWriteConnection()
            yield user.done
        stats = self.deployment.server.stats
        yield wait_until(lambda: stats.open == 0, 5, "connections to end")
        m = yield self.scrape()
        total = float(sum(sent))
        tunnel_labels = (
            ("hostname", "*"),
            ("listen_address", "127.0.0.1"),
            ("listen_port", str(self.port)),
        )
        self.assertEqual(
            m[("threshold_tunnel_received_bytes_total", tunnel_labels)], total
        )
        self.assertEqual(m[("threshold_tunnel_sent_bytes_total", tunnel_labels)], total)
        self.assertEqual(m[("threshold_tunnel_connections_total", tunnel_labels)], 3.0)
        self.assertEqual(m[("threshold_tunnel_connections_open", tunnel_labels)], 0.0)
        client = (("client_id", "TestClient1"),)
        self.assertEqual(m[("threshold_client_received_bytes_total", client)], total)
        self.assertEqual(m[("threshold_client_sent_bytes_total", client)], total)

    @inlineCallbacks
    def test_states_and_refusals(self):
        """Clients by state, tunnels in force, refusals and handshake failures."""
        yield self.deployment.stop_client("TestClient1")
        yield wait_until(
            lambda: not self.deployment.server.registry.is_connected("TestClient1"),
            5,
            "the client to go",
        )
        user = yield connect_user(self.port)
        yield user.done
        m = yield self.scrape()
        self.assertEqual(m[("threshold_clients", (("state", "ClientClosed"),))], 1.0)
        self.assertEqual(m[("threshold_clients", (("state", "ClientConnected"),))], 0.0)
        self.assertEqual(
            m[("threshold_client_connected", (("client_id", "TestClient1"),))], 0.0
        )
        self.assertEqual(m[("threshold_tunnels", ())], 1.0)
        self.assertEqual(m[("threshold_listening_sockets", ())], 1.0)
        self.assertEqual(
            m[
                (
                    "threshold_public_connections_refused_total",
                    (("reason", "client_not_connected"),),
                )
            ],
            1.0,
        )
        self.assertEqual(
            m[("threshold_handshake_failures_total", (("reason", "identity"),))], 0.0
        )
