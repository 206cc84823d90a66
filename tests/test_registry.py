"""The client registry: states, their transitions, replacement, the API view."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.session import GoAwayReceived, KeepaliveTimeout, ProtocolViolation
from threshold.server.registry import TRANSITIONS, ClientRegistry, ClientState


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
        session.streams = {1: object(), 2: object()}
        session.rtt = 0.0123456
        self.registry.connected("a", session, "p")
        view = self.registry.snapshot()["a"]
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
