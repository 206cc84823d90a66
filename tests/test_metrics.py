"""GET /metrics: exact byte counts and the states operators alert on."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from threshold.server.metrics import ServerCollector, render
from threshold.server.stats import GatewayStats, HandshakeFailure, Limit, Refusal


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
                    (("reason", "no_healthy_client"),),
                )
            ],
            1.0,
        )
        self.assertEqual(
            m[("threshold_handshake_failures_total", (("reason", "identity"),))], 0.0
        )


class _Records:
    def __init__(self, records):
        self._records = records

    def records(self):
        return self._records


class CollectorTests(SynchronousTestCase):
    """The collector reads the stats object and the client registry, nothing else."""

    def scrape(self, stats, records=()):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(stats, _Records(list(records))))
        return samples(render(registry).decode())

    def test_every_reason_exported(self):
        """Each refusal and handshake reason has a sample, zero or not."""
        stats = GatewayStats()
        stats.refuse(Refusal.LIMIT_FIRST_BYTE)
        stats.handshake_failed(HandshakeFailure.TIMEOUT)
        m = self.scrape(stats)
        for reason in Refusal:
            key = ("threshold_public_connections_refused_total", (("reason", reason),))
            self.assertEqual(m[key], 1.0 if reason is Refusal.LIMIT_FIRST_BYTE else 0)
        for failure in HandshakeFailure:
            key = ("threshold_handshake_failures_total", (("reason", failure),))
            self.assertEqual(m[key], 1.0 if failure is HandshakeFailure.TIMEOUT else 0)

    def test_gauges_and_limits_from_stats(self):
        """Tunnels, sockets, restore failures, limits: as the stats say."""
        stats = GatewayStats()
        stats.tunnels_in_force = 3
        stats.listening_sockets = 2
        stats.restore_failures = 1
        stats.limit_hit(Limit.CLIENT_HELLO)
        flow = stats.flow_opened(("127.0.0.1", 9000, "*"), "c")
        flow.bytes_in = 7
        m = self.scrape(stats)
        self.assertEqual(m[("threshold_tunnels", ())], 3.0)
        self.assertEqual(m[("threshold_listening_sockets", ())], 2.0)
        self.assertEqual(m[("threshold_tunnels_not_restored", ())], 1.0)
        self.assertEqual(
            m[("threshold_limits_hit_total", (("limit", "client_hello"),))], 1.0
        )
        self.assertEqual(
            m[("threshold_client_received_bytes_total", (("client_id", "c"),))], 7.0
        )
        self.assertEqual(
            m[("threshold_client_connections_open", (("client_id", "c"),))], 1.0
        )

    def test_refusal_help_is_true(self):
        """The help says relayed-but-idle closes are counted too."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(GatewayStats(), _Records([])))
        text = render(registry).decode()
        help_line = next(
            line
            for line in text.splitlines()
            if line.startswith("# HELP threshold_public_connections_refused_total")
        )
        self.assertIn("limit_idle", help_line)
        self.assertIn("limit_first_byte", help_line)

    def test_docs_list_every_reason(self):
        """docs/api.md names every refusal, handshake failure and limit label."""
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for member in [*Refusal, *HandshakeFailure, *Limit]:
            self.assertIn(f"`{member.value}`", text)
