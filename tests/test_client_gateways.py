"""A client of several gateways, in memory: one session each, each on its own.

Two reconnecting services share the client's settings and health monitor,
each joined to its own fake gateway (tests/clientkit.py GatewayEndpoint);
one gateway drains, goes down or falls silent while the other session
stays up, and the admin API shows both.
"""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.clientkit import GatewayEndpoint, make_settings
from tests.test_health import DB, WEB, FakeProbe
from threshold.client.admin import ClientAdminAPI
from threshold.client.gateway import GatewayLink, LinkState
from threshold.client.health import HealthMonitor
from threshold.client.service import reconnecting_service
from threshold.config.client import HealthCheck
from threshold.mux.session import GO_AWAY_NORMAL, SessionConfig
from threshold.wire.handshake import encode_hello_reply

BOTH_UP = b'{"health":{"web":true,"db":true}}\n'


class Client:
    """Settings, monitor and one service per gateway, as build_client makes."""

    def __init__(self, names=("gw1:9056", "gw2:9056"), session_config=None):
        self.clock = Clock()
        self.probe = FakeProbe()
        services = {"web": WEB, "db": DB}
        self.monitor = HealthMonitor(
            {"web": HealthCheck(), "db": HealthCheck()},
            services,
            self.clock,
            self.probe,
        )
        fields = {}
        if session_config is not None:
            fields["session_config"] = session_config
        self.settings = make_settings(
            clock=self.clock, services=services, health=self.monitor, **fields
        )
        self.links = [GatewayLink(name, self.clock) for name in names]
        self.endpoints = [
            GatewayEndpoint(self.clock, encode_hello_reply(True, gateway=f"id-{i}"))
            for i in range(len(names))
        ]
        self.services = [
            reconnecting_service(
                self.settings,
                link,
                endpoint,
                self.clock,
                initial_delay=1.0,
                max_delay=60.0,
                jitter=lambda: 0,
            )
            for link, endpoint in zip(self.links, self.endpoints, strict=True)
        ]

    def start(self) -> None:
        self.monitor.startService()
        self.probe.succeed()
        self.probe.succeed()
        for service in self.services:
            service.startService()
        self.run(0)

    def stop(self) -> None:
        stopped = [service.stopService() for service in self.services]
        self.run(1)
        self.monitor.stopService()
        for d in stopped:
            assert d.called

    def flush(self) -> None:
        for endpoint in self.endpoints:
            endpoint.flush()

    def run(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(round(seconds / step)):
            self.flush()
            self.clock.advance(step)
        self.flush()


class SeveralGatewaysTests(SynchronousTestCase):
    def test_one_session_each(self):
        """The client holds a session to every gateway, each told the health."""
        client = Client()
        client.start()
        for link, endpoint in zip(client.links, client.endpoints, strict=True):
            self.assertIs(link.state, LinkState.CONNECTED)
            self.assertEqual([h.client_id for h in endpoint.seen], ["TestClient1"])
            self.assertEqual(endpoint.control_lines, [BOTH_UP])
        self.assertEqual(
            [link.label for link in client.links],
            ["gw1:9056 (gateway id-0)", "gw2:9056 (gateway id-1)"],
        )
        client.stop()
        self.assertEqual([link.state for link in client.links], [LinkState.STOPPED] * 2)

    def test_draining_gateway_reconnected_later(self):
        """A gateway's Go Away: it is reconnected with backoff, the other stays."""
        client = Client()
        client.start()
        first, second = client.endpoints
        kept = second.gateways[0]
        # What a draining gateway does: close stream 1, then Go Away.
        first.answers[0].transport.loseConnection()
        first.gateways[0].go_away(GO_AWAY_NORMAL)
        client.run(0)
        self.assertIs(client.links[0].state, LinkState.WAITING)
        self.assertIs(client.links[1].state, LinkState.CONNECTED)
        client.run(1.75)
        self.assertEqual(len(first.attempts), 1)  # backing off: 2 s
        client.run(0.5)
        self.assertEqual(first.attempts, [0, 2.0])
        self.assertIs(client.links[0].state, LinkState.CONNECTED)
        self.assertEqual(client.links[0].sessions, 2)
        # The new session reported the health at once; the other session
        # never moved.
        self.assertEqual(first.control_lines, [BOTH_UP, BOTH_UP])
        self.assertEqual(second.gateways, [kept])
        self.assertFalse(kept.closed)
        client.stop()

    def test_gateway_down_backs_off_alone(self):
        """A gateway that refuses connections backs off; the other is untouched."""
        client = Client()
        client.start()
        first, second = client.endpoints
        first.refuse_connect = True
        first.gateways[0].transport.loseConnection()
        client.run(0)
        link = client.links[0]
        self.assertIs(link.state, LinkState.WAITING)
        client.run(30)
        gaps = [
            b - a for a, b in zip(first.attempts[1:], first.attempts[2:], strict=False)
        ]
        self.assertEqual([round(g) for g in gaps], [4, 8, 16])
        self.assertIn("cannot connect", link.last_error)
        self.assertIn("refused", link.last_error)
        self.assertEqual(len(second.attempts), 1)
        self.assertIs(client.links[1].state, LinkState.CONNECTED)
        # A change reaches the session that is up (the checks due since wait
        # for their answers).
        client.probe.succeed()
        client.probe.refuse()
        client.flush()
        self.assertEqual(len(second.control_lines), 2)
        first.refuse_connect = False
        client.run(40)
        self.assertIs(link.state, LinkState.CONNECTED)
        self.assertIsNone(link.last_error)
        client.stop()

    def test_refusals_counted_per_gateway(self):
        """Hellos refused by one gateway grow that gateway's backoff only."""
        client = Client()
        client.endpoints[0].reply = encode_hello_reply(False, "unknown client")
        client.start()
        client.run(16)
        first, second = client.links
        self.assertGreaterEqual(first.consecutive_refusals, 3)
        self.assertEqual(second.consecutive_refusals, 0)
        self.assertIn("unknown client", first.last_error)
        self.assertIs(second.state, LinkState.CONNECTED)
        client.stop()

    def test_silent_gateway_noticed_by_keepalive(self):
        """A gateway that stops answering is given up within interval + timeout."""
        config = SessionConfig(keepalive_interval=1.0, keepalive_timeout=2.0)
        client = Client(session_config=config)
        client.start()
        client.run(2)  # a few Pings answered
        self.assertIsNotNone(client.links[0].rtt)
        client.endpoints[0].black_hole = True
        dead_at = client.clock.seconds()
        for _ in range(40):
            if client.links[0].state is not LinkState.CONNECTED:
                break
            client.run(0.25)
        self.assertIs(client.links[0].state, LinkState.WAITING)
        self.assertLessEqual(client.clock.seconds() - dead_at, 3.0 + 0.25)
        self.assertIn("no answer to Ping", client.links[0].last_error)
        self.assertIs(client.links[1].state, LinkState.CONNECTED)
        client.endpoints[0].black_hole = False
        client.stop()


class StatusTests(SynchronousTestCase):
    def status(self, client: Client) -> dict:
        api = ClientAdminAPI(client.settings, client.links)
        treq = StubTreq(api.app.resource())
        response = self.successResultOf(treq.get("http://admin/status"))
        self.assertEqual(response.code, 200)
        return json.loads(self.successResultOf(response.content()))

    def test_status(self):
        """GET /status shows each gateway's session and each health check."""
        config = SessionConfig(keepalive_interval=1.0, keepalive_timeout=2.0)
        client = Client(session_config=config)
        client.clock.advance(1_700_000_000)
        client.start()
        client.endpoints[1].refuse_connect = True
        client.endpoints[1].gateways[0].transport.loseConnection()
        client.run(0)
        client.clock.advance(5)
        client.probe.succeed()
        client.probe.refuse()
        client.run(0)
        body = self.status(client)
        self.assertEqual(body["ClientId"], "TestClient1")
        up, down = body["Sessions"]
        self.assertEqual(up["Gateway"], "gw1:9056")
        self.assertEqual(up["GatewayId"], "id-0")
        self.assertEqual(up["State"], "connected")
        self.assertEqual(up["Since"], "2023-11-14T22:13:20Z")
        self.assertIsInstance(up["RttMilliseconds"], float)
        self.assertEqual(up["OpenStreams"], 0)
        self.assertIsNone(up["LastError"])
        self.assertEqual(down["State"], "waiting")
        self.assertIsNone(down["RttMilliseconds"])
        self.assertIn("cannot connect", down["LastError"])
        self.assertEqual(
            body["HealthChecks"],
            {
                "db": {
                    "State": "unhealthy",
                    "Address": "127.0.0.1:5432",
                    "Detail": "connection refused at 127.0.0.1:5432",
                    "LastChecked": "2023-11-14T22:13:25Z",
                    "IntervalSeconds": 5.0,
                    "TimeoutSeconds": 2.0,
                },
                "web": {
                    "State": "healthy",
                    "Address": "127.0.0.1:8080",
                    "Detail": None,
                    "LastChecked": "2023-11-14T22:13:25Z",
                    "IntervalSeconds": 5.0,
                    "TimeoutSeconds": 2.0,
                },
            },
        )
        client.stop()

    def test_live_config_through_api(self):
        """PUT /liveconfig moves the checks: a removed service shows stopped."""
        client = Client()
        client.start()
        api = ClientAdminAPI(client.settings, client.links)
        treq = StubTreq(api.app.resource())
        response = self.successResultOf(
            treq.put(
                "http://admin/liveconfig",
                data=b'{"ServiceToLocalAddrMap": {"web": "127.0.0.1:8081"}}',
                headers={"Content-Type": ["application/json"]},
            )
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(client.probe.calls[-1], ("127.0.0.1", 8081, 2.0))
        client.flush()
        for endpoint in client.endpoints:
            self.assertEqual(
                endpoint.control_lines, [BOTH_UP, b'{"health":{"web":true}}\n']
            )
        checks = self.status(client)["HealthChecks"]
        self.assertEqual(checks["db"]["State"], "stopped")
        self.assertIsNone(checks["db"]["Address"])
        self.assertEqual(checks["web"]["Address"], "127.0.0.1:8081")
        client.stop()

    def test_without_health_or_links(self):
        """A client without checks answers empty lists, as an older one would."""
        settings = make_settings()
        treq = StubTreq(ClientAdminAPI(settings).app.resource())
        response = self.successResultOf(treq.get("http://admin/status"))
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(
            body,
            {
                "ClientId": "TestClient1",
                "Sessions": [],
                "HealthChecks": {},
                "Counters": {
                    "UnknownService": 0,
                    "LocalFailures": 0,
                    "EgressConnections": 0,
                    "EgressRefused": 0,
                    "UdpFlows": 0,
                    "UdpDropped": {},
                },
            },
        )

    def test_status_counters(self):
        """GET /status shows the client's counters as they are now."""
        settings = make_settings()
        settings.stats.unknown_service = 2
        settings.stats.egress_connections = 3
        settings.stats.egress_refused = 1
        settings.stats.udp_flows = 5
        settings.stats.udp_dropped["window_full"] += 4
        settings.stats.udp_dropped["oversize"] += 1
        treq = StubTreq(ClientAdminAPI(settings).app.resource())
        response = self.successResultOf(treq.get("http://admin/status"))
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(
            body["Counters"],
            {
                "UnknownService": 2,
                "LocalFailures": 0,
                "EgressConnections": 3,
                "EgressRefused": 1,
                "UdpFlows": 5,
                "UdpDropped": {"oversize": 1, "window_full": 4},
            },
        )
