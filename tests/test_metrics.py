"""GET /metrics: exact byte counts and the states operators alert on."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.frontendkit import Gateway, Refusing, entry
from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from threshold.server.metrics import ServerCollector, render
from threshold.server.registry import ClientRecord
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


class _Session:
    """What the collector reads of a session."""

    def __init__(self) -> None:
        self.streams: dict[int, object] = {}
        self.rtt: float | None = None


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


def health_row(client_id: str, service: str) -> tuple[tuple[str, str], ...]:
    return (("client_id", client_id), ("service", service))


class BalancingMetricsTests(SynchronousTestCase):
    """Per tunnel and client: healthy, serving; failovers, retries; health."""

    def test_several_clients(self):
        gateway = Gateway(
            [entry(ClientIds=["a", "b", "gone"]), entry(port=9001, ClientIds=["b"])],
            clients=("a", "b"),
            accept=lambda stream: Refusing(),
        )
        gateway.report("a", web=True, db=False)
        gateway.connect(sent=b"x")  # a resets, b resets: one retry, one failure
        gateway.disconnect("a")  # a failover on 9000
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            ServerCollector(gateway.stats, gateway.registry, gateway.serving)
        )
        m = samples(render(registry).decode())

        def row(port, client=None):
            labels = {"hostname": "*", "listen_address": "127.0.0.1"}
            labels["listen_port"] = str(port)
            if client is not None:
                labels["client_id"] = client
            return tuple(sorted(labels.items()))

        for client, healthy, serving in (("a", 0, 0), ("b", 1, 1), ("gone", 0, 0)):
            self.assertEqual(
                m[("threshold_tunnel_client_healthy", row(9000, client))], healthy
            )
            self.assertEqual(
                m[("threshold_tunnel_client_serving", row(9000, client))], serving
            )
        self.assertEqual(m[("threshold_tunnel_client_serving", row(9001, "b"))], 1)
        self.assertEqual(m[("threshold_failovers_total", row(9000))], 1)
        self.assertNotIn(("threshold_failovers_total", row(9001)), m)
        self.assertEqual(m[("threshold_retries_total", row(9000))], 1)
        self.assertEqual(m[("threshold_retry_failures_total", row(9000))], 1)
        # a's report was forgotten with its session; b reported nothing.
        self.assertNotIn(
            (
                "threshold_client_service_healthy",
                (("client_id", "a"), ("service", "db")),
            ),
            m,
        )

    def test_reported_health(self):
        """Each service a connected client checks, 1 or 0."""
        gateway = Gateway([entry()], clients=("c",))
        gateway.report("c", web=True, db=False)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(gateway.stats, gateway.registry))
        m = samples(render(registry).decode())
        self.assertEqual(
            m[
                (
                    "threshold_client_service_healthy",
                    (("client_id", "c"), ("service", "db")),
                )
            ],
            0,
        )
        self.assertEqual(
            m[
                (
                    "threshold_client_service_healthy",
                    (("client_id", "c"), ("service", "web")),
                )
            ],
            1,
        )
        # Without a serving table the per-tunnel gauges are empty families.
        self.assertNotIn(("threshold_tunnel_client_healthy", ()), m)

    def test_control_stream_not_counted(self):
        """threshold_client_streams counts users' streams, not stream 1."""
        session = _Session()
        session.streams = {1: object(), 2: object()}
        record = ClientRecord("c", session=session)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(GatewayStats(), _Records([record])))
        m = samples(render(registry).decode())
        self.assertEqual(m[("threshold_client_streams", (("client_id", "c"),))], 1)
