"""The client registry: states, their transitions, replacement, the API view."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.session import GoAwayReceived, KeepaliveTimeout, ProtocolViolation
from threshold.server.registry import (
    GOING_AWAY,
    NOT_CONNECTED,
    TRANSITIONS,
    ClientHealth,
    ClientRegistry,
    ClientState,
)
from threshold.wire.control import Health


class FakeSession:
    """What the registry touches of a session."""

    def __init__(self) -> None:
        self.streams: dict[int, object] = {}
        self.rtt: float | None = None
        self.went_away: list[int] = []

    def go_away(self, code: int = 0) -> None:
        self.went_away.append(code)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def state(registry: ClientRegistry, client_id: str = "a") -> tuple[str, str]:
    view = registry.snapshot()[client_id]
    return view["CurrentState"], view["LastState"]


class StateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = ClientRegistry(self.clock)

    def test_values_are_the_api_strings(self):
        """The enum's values are the strings the API and metrics show."""
        self.assertEqual(
            [s.value for s in ClientState],
            ["ClientUnknown", "ClientConnected", "ClientClosed", "ClientError"],
        )
        self.assertEqual(ClientState.CONNECTED, "ClientConnected")

    def test_every_state_has_its_moves(self):
        """The transition table covers every state; nothing moves to Unknown."""
        self.assertEqual(set(TRANSITIONS), set(ClientState))
        for targets in TRANSITIONS.values():
            self.assertNotIn(ClientState.UNKNOWN, targets)

    def test_connected(self):
        """An accepted hello: connected, with peer, time and count."""
        session = FakeSession()
        self.registry.connected("a", session, "127.0.0.1:5000")
        self.assertEqual(state(self.registry), ("ClientConnected", "ClientUnknown"))
        view = self.registry.snapshot()["a"]
        self.assertEqual(view["Peer"], "127.0.0.1:5000")
        self.assertEqual(view["ConnectedSince"], "2023-11-14T22:13:20Z")
        self.assertEqual(view["Connections"], 1)
        self.assertIs(self.registry.session_for("a"), session)
        self.assertTrue(self.registry.is_connected("a"))
        self.assertEqual(self.registry.connected_count(), 1)

    def test_clean_end_is_closed(self):
        """A clean close or the peer's Go Away is ClientClosed, no error."""
        for reason in (ConnectionDone(), GoAwayReceived(0)):
            session = FakeSession()
            self.registry.connected("a", session, "p")
            self.registry.disconnected("a", session, reason)
            self.assertEqual(state(self.registry), ("ClientClosed", "ClientConnected"))
            self.assertIsNone(self.registry.snapshot()["a"]["LastError"])
            self.assertFalse(self.registry.is_connected("a"))

    def test_other_ends_are_errors(self):
        """A reset, a keepalive timeout, a protocol error are ClientError."""
        for reason in (
            ConnectionLost("reset by peer"),
            KeepaliveTimeout("no answer to Ping within 90s"),
            ProtocolViolation("Data past the window"),
        ):
            session = FakeSession()
            self.registry.connected("a", session, "p")
            self.registry.disconnected("a", session, reason)
            view = self.registry.snapshot()["a"]
            self.assertEqual(view["CurrentState"], "ClientError")
            self.assertIn(str(reason), view["LastError"])
            self.assertIsNone(view["ConnectedSince"])

    def test_error_cleared_on_reconnect(self):
        """A new connection clears the last error."""
        session = FakeSession()
        self.registry.connected("a", session, "p")
        self.registry.disconnected("a", session, ConnectionLost("x"))
        self.registry.connected("a", FakeSession(), "p")
        self.assertIsNone(self.registry.snapshot()["a"]["LastError"])
        self.assertEqual(self.registry.snapshot()["a"]["Connections"], 2)

    def test_closing_is_closed_at_once(self):
        """A client's Go Away shows it closed before its session ends."""
        session = FakeSession()
        self.registry.connected("a", session, "p")
        self.registry.closing("a", session)
        self.assertEqual(state(self.registry), ("ClientClosed", "ClientConnected"))
        self.assertIsNone(self.registry.session_for("a"))
        # The session's end, later, changes nothing more, even as an error.
        self.clock.now += 10
        self.registry.disconnected("a", session, ConnectionLost("late reset"))
        self.assertEqual(state(self.registry), ("ClientClosed", "ClientConnected"))
        self.assertIsNone(self.registry.snapshot()["a"]["LastError"])

    def test_replacement(self):
        """A newer session replaces the older, which gets Go Away 0; the
        older one's end or Go Away does not touch the newer."""
        old, new = FakeSession(), FakeSession()
        self.registry.connected("a", old, "p1")
        self.registry.connected("a", new, "p2")
        self.assertEqual(old.went_away, [0])
        self.assertEqual(new.went_away, [])
        self.assertEqual(state(self.registry), ("ClientConnected", "ClientConnected"))
        self.registry.closing("a", old)
        self.registry.disconnected("a", old, ConnectionLost("x"))
        self.assertIs(self.registry.session_for("a"), new)
        self.assertEqual(self.registry.snapshot()["a"]["Peer"], "p2")

    def test_unknown_client_end_ignored(self):
        """An end for a client never connected changes nothing."""
        self.registry.disconnected("ghost", FakeSession(), ConnectionDone())
        self.registry.closing("ghost", FakeSession())
        self.assertEqual(self.registry.snapshot(), {})

    def test_session_figures(self):
        """Open streams and RTT come from the live session."""
        session = FakeSession()
        session.streams = {1: object(), 2: object(), 4: object()}
        session.rtt = 0.0123456
        self.registry.connected("a", session, "p")
        view = self.registry.snapshot()["a"]
        # Stream 1, the control channel, is not a user's stream.
        self.assertEqual(view["OpenStreams"], 2)
        self.assertEqual(view["RttMilliseconds"], 12.346)
        self.registry.disconnected("a", session, ConnectionDone())
        view = self.registry.snapshot()["a"]
        self.assertEqual((view["OpenStreams"], view["RttMilliseconds"]), (0, None))

    def test_snapshot_sorted(self):
        """Clients are listed by ClientId."""
        for cid in ("b", "c", "a"):
            self.registry.connected(cid, FakeSession(), "p")
        self.assertEqual(list(self.registry.snapshot()), ["a", "b", "c"])
        self.assertEqual(len(self.registry.records()), 3)


class HealthTests(SynchronousTestCase):
    """Reported health per client and service, and whether a client can serve."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = ClientRegistry(self.clock)
        self.changes: list[str] = []
        self.registry.subscribe(self.changes.append)
        self.session = FakeSession()
        self.registry.connected("a", self.session, "p")

    def health(self, service: str = "web") -> ClientHealth:
        return self.registry.health_for("a", service)

    def test_unchecked_is_healthy(self):
        """A connected client that reports nothing is healthy for every service."""
        self.assertEqual(self.health(), ClientHealth("a", True, True))
        self.assertEqual(self.registry.snapshot()["a"]["Health"], {})

    def test_reported_unhealthy_with_detail(self):
        """A service reported down is unhealthy, with the client's detail."""
        detail = {"web": "connection refused at 127.0.0.1:80"}
        self.assertTrue(
            self.registry.health_reported(
                "a", self.session, Health({"web": False, "db": True}, detail)
            )
        )
        web = self.health("web")
        self.assertEqual((web.connected, web.healthy), (True, False))
        self.assertEqual(
            web.reason, "service web unhealthy: connection refused at 127.0.0.1:80"
        )
        self.assertTrue(self.health("db").healthy)
        self.assertTrue(self.health("other").healthy)
        view = self.registry.snapshot()["a"]
        self.assertEqual(
            view["Health"],
            {
                "db": {"Healthy": True, "Detail": None},
                "web": {"Healthy": False, "Detail": detail["web"]},
            },
        )
        self.assertEqual(view["HealthReported"], "2023-11-14T22:13:20Z")

    def test_full_state_replaces(self):
        """Each report is the full state: a service left out is unchecked again."""
        self.registry.health_reported("a", self.session, Health({"web": False}))
        self.registry.health_reported("a", self.session, Health({"db": True}))
        self.assertTrue(self.health("web").healthy)
        self.assertEqual(self.health("web").reason, None)

    def test_without_detail(self):
        """No detail: the reason names the service only."""
        self.registry.health_reported("a", self.session, Health({"web": False}))
        self.assertEqual(self.health().reason, "service web unhealthy")

    def test_listeners_told_of_changes_only(self):
        """Subscribers hear connected, each real change, and the end."""
        self.assertEqual(self.changes, ["a"])
        health = Health({"web": False})
        self.assertTrue(self.registry.health_reported("a", self.session, health))
        self.assertFalse(self.registry.health_reported("a", self.session, health))
        self.assertEqual(self.changes, ["a", "a"])
        self.registry.disconnected("a", self.session, ConnectionDone())
        self.assertEqual(self.changes, ["a", "a", "a"])

    def test_old_session_does_not_speak(self):
        """A replaced session's report changes nothing."""
        new = FakeSession()
        self.registry.connected("a", new, "p2")
        self.assertFalse(
            self.registry.health_reported("a", self.session, Health({"web": False}))
        )
        self.assertTrue(self.health().healthy)

    def test_health_forgotten_with_the_session(self):
        """The end of the session forgets its health; a new one starts healthy."""
        self.registry.health_reported("a", self.session, Health({"web": False}))
        self.registry.disconnected("a", self.session, ConnectionLost("reset"))
        gone = self.health()
        self.assertEqual((gone.connected, gone.healthy), (False, False))
        self.assertEqual(gone.reason, NOT_CONNECTED)
        self.assertIn("session lost", gone.why)
        self.assertEqual(self.registry.snapshot()["a"]["Health"], {})
        self.registry.connected("a", FakeSession(), "p")
        self.assertTrue(self.health().healthy)

    def test_replacement_forgets_health(self):
        """A newer session starts with nothing reported."""
        self.registry.health_reported("a", self.session, Health({"web": False}))
        self.registry.connected("a", FakeSession(), "p2")
        self.assertTrue(self.health().healthy)

    def test_going_away_until_drained(self):
        """After the client's Go Away it is "going away" until the session ends."""
        self.registry.closing("a", self.session)
        state = self.health()
        self.assertEqual((state.connected, state.healthy), (False, False))
        self.assertEqual(state.reason, GOING_AWAY)
        self.assertTrue(self.registry.snapshot()["a"]["GoingAway"])
        self.registry.disconnected("a", self.session, ConnectionDone())
        self.assertEqual(self.health().reason, NOT_CONNECTED)
        self.assertEqual(self.health().why, "session closed")
        self.assertFalse(self.registry.snapshot()["a"]["GoingAway"])
        self.assertEqual(self.changes[-2:], ["a", "a"])

    def test_never_seen(self):
        """A client never accepted is not connected."""
        state = self.registry.health_for("nobody", "web")
        self.assertEqual(
            state, ClientHealth("nobody", False, False, NOT_CONNECTED, NOT_CONNECTED)
        )

    def test_replacement_retires_the_old_session(self):
        """The older session is ended with the retire function it came with."""
        retired: list[str] = []
        registry = ClientRegistry(self.clock)
        first = FakeSession()
        registry.connected("b", first, "p", retire=lambda: retired.append("first"))
        registry.connected("b", FakeSession(), "p2")
        self.assertEqual(retired, ["first"])
        self.assertEqual(first.went_away, [])
