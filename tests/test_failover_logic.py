"""Several clients per tunnel, in memory: the choice, health, the serving log.

A gateway (tests/frontendkit.py) with clients joined in memory; users
connect, sessions end, clients report health, and each test checks where
connections went, what the serving table says, the log lines and counters.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionLost
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.frontendkit import Gateway, entry
from threshold.server.routes import parse_tunnels
from threshold.server.stats import Refusal
from threshold.wire.control import Health

KEY = ("127.0.0.1", 9000, "*")


def tunnel(*clients: str, balance: str = "failover", **more):
    return entry(ClientIds=list(clients), Balance=balance, **more)


class Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def serving_lines(self) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_format", "").startswith("tunnel {tunnel}: serving")
        ]

    def served(self, gateway: Gateway) -> dict[str, int]:
        return {cid: len(side.accepted) for cid, side in gateway.sides.items()}

    def users(self, gateway: Gateway, count: int, close: bool = True) -> list:
        users = []
        for i in range(count):
            user = gateway.connect(peer=("203.0.113.9", 40000 + i), sent=b"GET /")
            if close:
                user.transport.loseConnection()
                gateway.flush()
            users.append(user)
        return users


class FailoverTests(Case):
    def test_first_healthy_takes_every_connection(self):
        """Failover: the first client of the list gets every connection."""
        gateway = Gateway([tunnel("a", "b")], clients=("a", "b"))
        self.users(gateway, 5)
        self.assertEqual(self.served(gateway), {"a": 5, "b": 0})
        view = gateway.serving.view(gateway.routes.tunnels()[0])
        self.assertEqual(view.serving, ("a",))

    def test_moves_on_session_end_and_back(self):
        """A closed session sends the next connection to b at once; when a is
        back it gets them again. One log line per change, one failover."""
        gateway = Gateway([tunnel("a", "b")], clients=("a", "b"))
        self.users(gateway, 1)
        gateway.disconnect("a")
        self.users(gateway, 2)
        self.assertEqual(self.served(gateway), {"a": 1, "b": 2})
        gateway.add_client("a")
        self.users(gateway, 3)
        self.assertEqual(len(gateway.sides["a"].accepted), 3)
        self.assertEqual(
            self.serving_lines(),
            [
                "tunnel 127.0.0.1:9000 web: serving b (was a: session closed)",
                "tunnel 127.0.0.1:9000 web: serving a (was b: a healthy again)",
            ],
        )
        # Only the change away from a failed client is a failover.
        self.assertEqual(gateway.stats.failovers[KEY], 1)

    def test_reset_session_reason(self):
        """A session lost (reset) is logged with its reason."""
        gateway = Gateway([tunnel("a", "b")], clients=("a", "b"))
        side = gateway.sides["a"]
        side.session.connectionLost(Failure(ConnectionLost("reset by peer")))
        gateway.flush()
        self.assertEqual(len(self.serving_lines()), 1)
        self.assertIn("was a: session lost: ", self.serving_lines()[0])
        self.assertIn("reset by peer", self.serving_lines()[0])
        self.users(gateway, 1)
        self.assertEqual(self.served(gateway)["b"], 1)

    def test_going_away_moves_at_once(self):
        """A client's Go Away moves new connections while its streams drain."""
        gateway = Gateway([tunnel("a", "b")], clients=("a", "b"))
        running = self.users(gateway, 1, close=False)
        gateway.sides["a"].client.go_away()
        gateway.flush()
        self.users(gateway, 2)
        self.assertEqual(self.served(gateway), {"a": 1, "b": 2})
        self.assertFalse(running[0].transport.ended)
        self.assertEqual(
            self.serving_lines(),
            ["tunnel 127.0.0.1:9000 web: serving b (was a: going away)"],
        )
        view = gateway.serving.view(gateway.routes.tunnels()[0])
        self.assertEqual(view.clients[0].reason, "going away")

    def test_unhealthy_service_moves_and_back(self):
        """The client reporting the tunnel's service down moves it; another
        service of that client does not."""
        gateway = Gateway([tunnel("a", "b")], clients=("a", "b"))
        gateway.report("a", db=False)
        self.users(gateway, 1)
        self.assertEqual(self.served(gateway), {"a": 1, "b": 0})
        gateway.registry.health_reported(
            "a",
            gateway.sides["a"].session,
            Health({"web": False}, {"web": "connection refused at 127.0.0.1:80"}),
        )
        self.users(gateway, 1)
        self.assertEqual(self.served(gateway), {"a": 1, "b": 1})
        gateway.report("a", web=True)
        self.users(gateway, 1)
        self.assertEqual(self.served(gateway), {"a": 2, "b": 1})
        self.assertEqual(
            self.serving_lines(),
            [
                "tunnel 127.0.0.1:9000 web: serving b (was a: service web unhealthy:"
                " connection refused at 127.0.0.1:80)",
                "tunnel 127.0.0.1:9000 web: serving a (was b: a healthy again)",
            ],
        )
        self.assertEqual(gateway.stats.failovers[KEY], 1)

    def test_no_healthy_client(self):
        """With no client healthy users are closed, counted, and told why."""
        gateway = Gateway([tunnel("a", "b")], clients=("a", "b"))
        gateway.disconnect("a")
        gateway.report("b", web=False)
        user = gateway.connect(sent=b"GET /")
        self.assertTrue(user.transport.ended)
        self.assertEqual(gateway.stats.refused[Refusal.NO_HEALTHY_CLIENT], 1)
        self.assertEqual(self.served(gateway), {"a": 0, "b": 0})
        self.assertEqual(gateway.stats.open, 0)
        refusal = [
            formatEvent(e) for e in self.events if "refused" in e.get("log_format", "")
        ]
        self.assertEqual(len(refusal), 1)
        self.assertIn("a: not connected; b: service web unhealthy", refusal[0])
        self.assertEqual(
            self.serving_lines()[-1],
            "tunnel 127.0.0.1:9000 web: serving nobody (was b: service web unhealthy)",
        )
        # a failed while serving, then b: two failovers.
        self.assertEqual(gateway.stats.failovers[KEY], 2)

    def test_client_never_connected(self):
        """A tunnel of a client never seen listens; its users are refused."""
        gateway = Gateway([tunnel("nobody")], clients=("c",))
        user = gateway.connect(sent=b"x")
        self.assertTrue(user.transport.ended)
        self.assertEqual(gateway.stats.refused[Refusal.NO_HEALTHY_CLIENT], 1)
        self.assertEqual(gateway.stats.failovers[KEY], 0)

    def test_client_connects_later(self):
        """A client connecting after the PUT starts serving: logged, no failover."""
        gateway = Gateway([tunnel("late")], clients=("c",))
        gateway.add_client("late")
        self.users(gateway, 1)
        self.assertEqual(len(gateway.sides["late"].accepted), 1)
        self.assertEqual(
            self.serving_lines(),
            ["tunnel 127.0.0.1:9000 web: serving late (was nobody: late healthy)"],
        )
        self.assertEqual(gateway.stats.failovers[KEY], 0)

    def test_one_line_per_change_not_per_connection(self):
        """Many connections and repeated identical reports log nothing more."""
        gateway = Gateway([tunnel("a", "b")], clients=("a", "b"))
        self.users(gateway, 10)
        gateway.report("a", db=True)
        gateway.report("a", db=True)
        self.assertEqual(self.serving_lines(), [])

    def test_put_changes_order(self):
        """A PUT that reorders the clients moves the tunnel: logged as a change
        of the set, not a failover."""
        gateway = Gateway([tunnel("a", "b")], clients=("a", "b"))
        gateway.routes.apply(parse_tunnels([tunnel("b", "a")]))
        self.users(gateway, 1)
        self.assertEqual(self.served(gateway), {"a": 0, "b": 1})
        self.assertEqual(
            self.serving_lines(),
            ["tunnel 127.0.0.1:9000 web: serving b (was a: tunnel set changed)"],
        )
        self.assertEqual(gateway.stats.failovers[KEY], 0)

    def test_hostname_tunnel_log_names_the_glob(self):
        """A hostname-routed tunnel's log line names its glob."""
        gateway = Gateway(
            [tunnel("a", "b", glob="www.example.com")], clients=("a", "b")
        )
        gateway.disconnect("a")
        self.assertEqual(
            self.serving_lines(),
            [
                "tunnel 127.0.0.1:9000 www.example.com web: serving b"
                " (was a: session closed)"
            ],
        )


class SpreadTests(Case):
    def test_round_robin(self):
        """Round-robin: each healthy client in turn."""
        gateway = Gateway(
            [tunnel("a", "b", "c", balance="round-robin")], clients=("a", "b", "c")
        )
        self.users(gateway, 9)
        self.assertEqual(self.served(gateway), {"a": 3, "b": 3, "c": 3})
        gateway.disconnect("b")
        self.users(gateway, 10)
        self.assertEqual(self.served(gateway), {"a": 8, "b": 3, "c": 8})
        self.assertEqual(
            self.serving_lines(),
            ["tunnel 127.0.0.1:9000 web: serving a, c (was a, b, c: b session closed)"],
        )
        # Not a failover tunnel: nothing counted.
        self.assertEqual(gateway.stats.failovers[KEY], 0)

    def test_least_connections(self):
        """Least-connections: the client with the fewest of the tunnel's
        connections open; closed ones do not count."""
        gateway = Gateway(
            [tunnel("a", "b", balance="least-connections")], clients=("a", "b")
        )
        held = self.users(gateway, 4, close=False)
        self.assertEqual(self.served(gateway), {"a": 2, "b": 2})
        # Close both of a's: the next two go to a.
        for user in held:
            if user.flow.client_id == "a":
                user.transport.loseConnection()
        gateway.flush()
        self.users(gateway, 2, close=False)
        self.assertEqual(self.served(gateway), {"a": 4, "b": 2})
        self.assertEqual(gateway.stats.open_per_client(KEY), {"a": 2, "b": 2})

    def test_least_connections_sequential_alternate(self):
        """Connections closed before the next arrives still alternate."""
        gateway = Gateway(
            [tunnel("a", "b", balance="least-connections")], clients=("a", "b")
        )
        self.users(gateway, 10)
        self.assertEqual(self.served(gateway), {"a": 5, "b": 5})

    def test_status_views(self):
        """The serving table's view: each client's state and who serves."""
        gateway = Gateway(
            [tunnel("a", "b", "gone", balance="round-robin")], clients=("a", "b")
        )
        gateway.report("b", web=False)
        view = gateway.serving.view(gateway.routes.tunnels()[0])
        self.assertEqual(
            view.to_json(),
            {
                "Clients": [
                    {
                        "ClientId": "a",
                        "Connected": True,
                        "Healthy": True,
                        "Reason": None,
                    },
                    {
                        "ClientId": "b",
                        "Connected": True,
                        "Healthy": False,
                        "Reason": "service web unhealthy",
                    },
                    {
                        "ClientId": "gone",
                        "Connected": False,
                        "Healthy": False,
                        "Reason": "not connected",
                    },
                ],
                "Serving": ["a"],
            },
        )

    def test_tunnels_of_other_clients_untouched(self):
        """A client's change recomputes its tunnels only."""
        gateway = Gateway([tunnel("a"), tunnel("b", port=9001)], clients=("a", "b"))
        gateway.disconnect("a")
        self.assertEqual(
            self.serving_lines(),
            ["tunnel 127.0.0.1:9000 web: serving nobody (was a: session closed)"],
        )
        self.users_on(gateway, 9001)
        self.assertEqual(self.served(gateway), {"a": 0, "b": 1})

    def users_on(self, gateway: Gateway, port: int) -> None:
        user = gateway.connect(port=port, sent=b"x")
        user.transport.loseConnection()
        gateway.flush()
