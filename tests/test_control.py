"""Control connections in memory: admission, the hello, states, Go Away."""

from __future__ import annotations

import json
from collections import Counter

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionClosed, SessionConfig
from threshold.server.admission import RefusedConnection
from threshold.server.control import (
    MOVES,
    ControlFactory,
    ControlSettings,
    ControlState,
)
from threshold.server.control_lines import MALFORMED_LOG_INTERVAL
from threshold.server.registry import ClientRegistry, ClientState
from threshold.server.stats import HandshakeFailure, Limit
from threshold.testing import Collector
from threshold.wire.control import Health, encode_health
from threshold.wire.handshake import MAX_LINE, encode_hello

QUIET = SessionConfig(keepalive_interval=0)


class Counters:
    def __init__(self) -> None:
        self.failures: Counter[HandshakeFailure] = Counter()
        self.limits: Counter[Limit] = Counter()

    def handshake_failed(self, reason: HandshakeFailure) -> None:
        self.failures[reason] += 1

    def limit_hit(self, limit: Limit, **where: object) -> None:
        self.limits[limit] += 1
        self.where = where


class Gateway:
    """A control factory with its registry, counters and clock."""

    def __init__(self, **settings) -> None:
        self.clock = Clock()
        self.registry = ClientRegistry()
        self.counters = Counters()
        self.factory = ControlFactory(
            self.registry,
            ControlSettings(session=QUIET, **settings),
            self.clock,
            self.counters,
        )

    def dial(self, source: str = "10.0.0.1"):
        """A raw client session connected in memory; (client, server, pump)."""
        address = IPv4Address("TCP", source, 40000)
        client, session, pump = iosim.connectedServerAndClient(
            lambda: self.factory.buildProtocol(address),
            lambda: MuxSession(
                client=True,
                clock=self.clock,
                handler=StreamAcceptor(lambda s: Collector()),
                config=QUIET,
            ),
            clock=self.clock,
        )
        return client, session, pump

    def control(self, session: MuxSession):
        return session.handler


def hello(client: MuxSession, pump, client_id: str = "TestClient1") -> Collector:
    reply = Collector()
    stream = client.open_stream(reply)
    stream.write(encode_hello(client_id))
    pump.flush()
    return reply


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = Gateway()

    def test_hello_accepted(self):
        """A valid hello is answered ok and the client is connected."""
        client, session, pump = self.gw.dial()
        reply = hello(client, pump)
        self.assertEqual(json.loads(reply.data), {"ok": True})
        self.assertTrue(self.gw.registry.is_connected("TestClient1"))
        snapshot = self.gw.registry.snapshot()["TestClient1"]
        self.assertEqual(snapshot["CurrentState"], "ClientConnected")
        self.assertEqual(snapshot["LastState"], "ClientUnknown")
        self.assertEqual(snapshot["Peer"], "10.0.0.1:40000")
        self.assertIs(self.gw.control(session).state, ControlState.ACCEPTED)

    def test_hello_in_pieces(self):
        """A hello split into single bytes is read whole."""
        client, session, pump = self.gw.dial()
        reply = Collector()
        stream = client.open_stream(reply)
        for byte in encode_hello("TestClient1"):
            stream.write(bytes([byte]))
            pump.flush()
        self.assertEqual(json.loads(reply.data), {"ok": True})

    def test_bad_hello_refused(self):
        """A hello that is not JSON gets ok false with the reason, then Go Away."""
        client, session, pump = self.gw.dial()
        reply = Collector()
        client.open_stream(reply).write(b"hello there\n")
        pump.flush()
        answer = json.loads(reply.data)
        self.assertFalse(answer["ok"])
        self.assertIn("JSON", answer["error"])
        self.assertTrue(client.closed)
        self.assertEqual(self.gw.counters.failures, {HandshakeFailure.BAD_HELLO: 1})
        self.assertEqual(self.gw.registry.snapshot(), {})

    def test_overlong_hello_refused(self):
        """More than MAX_LINE bytes without a newline is refused at once."""
        client, session, pump = self.gw.dial()
        reply = Collector()
        stream = client.open_stream(reply)
        stream.write(b"x" * MAX_LINE)
        pump.flush()
        self.assertEqual(reply.data, b"")
        stream.write(b"x")
        pump.flush()
        answer = json.loads(reply.data)
        self.assertIn(f"longer than {MAX_LINE} bytes", answer["error"])
        self.assertTrue(client.closed)
        self.assertEqual(self.gw.counters.failures, {HandshakeFailure.BAD_HELLO: 1})

    def test_bytes_after_the_hello_ignored(self):
        """Lines after the hello in the same write do not count as hellos."""
        client, session, pump = self.gw.dial()
        reply = Collector()
        client.open_stream(reply).write(encode_hello("A") + b"garbage\n")
        pump.flush()
        self.assertEqual(json.loads(reply.data), {"ok": True})
        self.assertEqual(self.gw.counters.failures, {})

    def test_stream_closed_before_hello(self):
        """Closing stream 1 without a hello fails the handshake (closed)."""
        client, session, pump = self.gw.dial()
        stream = client.open_stream(Collector())
        stream.write(b'{"version": 1')
        stream.loseConnection()
        pump.flush()
        self.assertEqual(self.gw.counters.failures, {HandshakeFailure.CLOSED: 1})
        self.assertTrue(client.closed)

    def test_hello_timeout_while_reading(self):
        """Stream 1 open but no full hello within the timeout: answered, closed."""
        gw = Gateway(handshake_timeout=5)
        client, session, pump = gw.dial()
        reply = Collector()
        client.open_stream(reply).write(b'{"version"')
        pump.flush()
        gw.clock.advance(4.9)
        pump.flush()
        self.assertFalse(client.closed)
        gw.clock.advance(0.2)
        pump.flush()
        self.assertIn("no hello within 5", json.loads(reply.data)["error"])
        self.assertTrue(client.closed)
        self.assertEqual(gw.counters.failures, {HandshakeFailure.TIMEOUT: 1})

    def test_silent_connection_cut_at_timeout(self):
        """No stream 1 at all (no TLS, say): aborted at the timeout."""
        gw = Gateway(handshake_timeout=5)
        client, session, pump = gw.dial()
        gw.clock.advance(5.1)
        pump.flush()
        self.assertTrue(client.closed)
        self.assertEqual(gw.counters.failures, {HandshakeFailure.TIMEOUT: 1})
        self.assertEqual(len(gw.factory.pending), 0)
        self.assertEqual(gw.factory.connections, set())

    def test_streams_before_hello_refused(self):
        """Until the hello is accepted, no stream other than 1 is accepted."""
        client, session, pump = self.gw.dial()
        client.open_stream(Collector()).write(b'{"version": 1')
        other = Collector()
        client.open_stream(other).write(b"x")
        pump.flush()
        self.assertIsNotNone(other.lost)
        self.assertEqual(self.gw.registry.snapshot(), {})
        self.assertIs(self.gw.control(session).state, ControlState.READING_HELLO)

    def test_client_streams_after_hello_refused(self):
        """Client-opened streams other than 1 are reserved, so refused."""
        client, session, pump = self.gw.dial()
        hello(client, pump)
        other = Collector()
        client.open_stream(other).write(b"x")
        pump.flush()
        self.assertIsNotNone(other.lost)
        self.assertTrue(self.gw.registry.is_connected("TestClient1"))

    def test_identity_required_with_tls(self):
        """With TLS, a transport without a certificate cannot pass the hello."""
        gw = Gateway(use_tls=True)
        client, session, pump = gw.dial()
        answer = json.loads(hello(client, pump).data)
        self.assertFalse(answer["ok"])
        self.assertIn("does not match the certificate", answer["error"])
        self.assertEqual(gw.counters.failures, {HandshakeFailure.IDENTITY: 1})

    def test_server_full(self):
        """Past MaxClients, new client ids are refused; known ones are not."""
        gw = Gateway(max_clients=1)
        c1, _, p1 = gw.dial()
        hello(c1, p1, "A")
        c2, _, p2 = gw.dial()
        self.assertIn("server full", json.loads(hello(c2, p2, "B").data)["error"])
        c3, _, p3 = gw.dial()
        self.assertEqual(json.loads(hello(c3, p3, "A").data), {"ok": True})

    def test_newest_connection_wins(self):
        """A second connection of the same ClientId replaces the first."""
        c1, s1, p1 = self.gw.dial()
        hello(c1, p1)
        c2, s2, p2 = self.gw.dial()
        hello(c2, p2)
        p1.flush()
        self.assertIs(self.gw.registry.session_for("TestClient1"), s2)
        # The old one got Go Away: it opens no new stream and closes once its
        # last stream is done (here stream 1, reset after the linger time).
        self.assertRaises(SessionClosed, c1.open_stream, Collector())
        self.gw.clock.advance(s1.config.stream_linger + 1)
        p1.flush()
        self.assertTrue(c1.closed)
        self.assertTrue(self.gw.registry.is_connected("TestClient1"))

    def test_states_on_close_and_error(self):
        """A clean end is ClientClosed; a lost connection is ClientError."""
        c1, s1, p1 = self.gw.dial()
        hello(c1, p1)
        c1.close()
        p1.flush()
        state = self.gw.registry.snapshot()["TestClient1"]
        self.assertEqual(
            (state["CurrentState"], state["LastState"]),
            ("ClientClosed", "ClientConnected"),
        )
        c2, s2, p2 = self.gw.dial()
        hello(c2, p2)
        s2.connectionLost(Failure(ConnectionLostForTest("reset")))
        state = self.gw.registry.snapshot()["TestClient1"]
        self.assertEqual(state["CurrentState"], "ClientError")
        self.assertIn("reset", state["LastError"])
        self.assertIs(self.gw.control(s2).state, ControlState.CLOSED)


class ConnectionLostForTest(Exception):
    pass


class GoAwayTests(SynchronousTestCase):
    def test_go_away_shows_closed_at_once(self):
        """A client's Go Away makes it ClientClosed while its streams drain."""
        gw = Gateway()
        client, session, pump = gw.dial()
        hello(client, pump)
        user = Collector()
        stream = session.open_stream(user)
        pump.flush()
        client.go_away()
        pump.flush()
        # The user's stream is still running, the session still up ...
        self.assertFalse(session.closed)
        self.assertIn(stream.id, session.streams)
        # ... yet the client is closed and takes no new tunnel.
        view = gw.registry.snapshot()["TestClient1"]
        self.assertEqual(view["CurrentState"], ClientState.CLOSED)
        self.assertFalse(gw.registry.is_connected("TestClient1"))
        self.assertIsNone(gw.registry.session_for("TestClient1"))
        # The stream still delivers; its end then closes the session, which
        # changes the state no more.
        stream.write(b"last")
        stream.loseConnection()
        for s in list(client.streams.values()):
            s.loseConnection()
        pump.flush()
        self.assertTrue(session.closed)
        self.assertEqual(
            gw.registry.snapshot()["TestClient1"]["LastState"], "ClientConnected"
        )

    def test_go_away_before_hello(self):
        """A Go Away during the handshake registers nothing."""
        gw = Gateway()
        client, session, pump = gw.dial()
        client.go_away()
        pump.flush()
        self.assertEqual(gw.registry.snapshot(), {})


class StateTests(SynchronousTestCase):
    def test_moves_cover_every_state(self):
        """The transition table names every state; Closed is final."""
        self.assertEqual(set(MOVES), set(ControlState))
        self.assertEqual(MOVES[ControlState.CLOSED], frozenset())
        for targets in MOVES.values():
            self.assertNotIn(ControlState.PENDING, targets)

    def test_path_of_an_accepted_client(self):
        """Pending, reading the hello, accepted, closed."""
        gw = Gateway()
        client, session, pump = gw.dial()
        control = gw.control(session)
        seen = [control.state]
        reply = Collector()
        stream = client.open_stream(reply)
        pump.flush()
        seen.append(control.state)
        stream.write(encode_hello("A"))
        pump.flush()
        seen.append(control.state)
        client.close()
        pump.flush()
        seen.append(control.state)
        self.assertEqual(
            seen,
            [
                ControlState.PENDING,
                ControlState.READING_HELLO,
                ControlState.ACCEPTED,
                ControlState.CLOSED,
            ],
        )

    def test_no_impossible_move(self):
        """A move the table does not allow is refused loudly."""
        gw = Gateway()
        client, session, pump = gw.dial()
        control = gw.control(session)
        self.assertRaises(AssertionError, control._move, ControlState.ACCEPTED)


class BudgetTests(SynchronousTestCase):
    def test_sessions_share_the_gateway_budget(self):
        """Every client session draws its window growth from one budget."""
        gw = Gateway(gateway_window_budget=1024 * 1024)
        _, s1, _ = gw.dial("10.0.0.1")
        _, s2, _ = gw.dial("10.0.0.2")
        self.assertIs(s1.budget.parent, gw.factory.window_budget)
        self.assertIs(s2.budget.parent, gw.factory.window_budget)
        self.assertEqual(gw.factory.window_budget.limit, 1024 * 1024)


class AdmissionTests(SynchronousTestCase):
    def test_pending_handshakes_limited(self):
        """Past MaxPendingHandshakes, new control connections are refused."""
        gw = Gateway(max_pending_handshakes=2, max_pending_per_source=0)
        address = IPv4Address("TCP", "10.0.0.1", 1)
        self.assertIsInstance(gw.factory.buildProtocol(address), MuxSession)
        self.assertIsInstance(gw.factory.buildProtocol(address), MuxSession)
        refused = gw.factory.buildProtocol(address)
        self.assertIsInstance(refused, RefusedConnection)
        self.assertEqual(gw.counters.limits, {Limit.PENDING_HANDSHAKES: 1})
        transport = StringTransport()
        refused.makeConnection(transport)
        self.assertTrue(transport.disconnecting)

    def test_per_source_share(self):
        """One source gets its share of pending slots; another still gets in."""
        gw = Gateway(max_pending_per_source=3)
        for _ in range(3):
            gw.dial("10.0.0.2")
        self.assertIsInstance(
            gw.factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 40001)),
            RefusedConnection,
        )
        self.assertEqual(gw.counters.limits, {Limit.PENDING_HANDSHAKES_PER_SOURCE: 1})
        client, session, pump = gw.dial("10.0.0.3")
        self.assertEqual(json.loads(hello(client, pump).data), {"ok": True})

    def test_accepted_clients_free_their_slot(self):
        """Clients past the hello free their pending slot."""
        gw = Gateway(max_pending_handshakes=1)
        client, session, pump = gw.dial()
        hello(client, pump)
        self.assertEqual(len(gw.factory.pending), 0)
        self.assertIsInstance(gw.factory.buildProtocol(None), MuxSession)

    def test_refused_connection_holds_its_slot_until_closed(self):
        """A refused connection's socket counts until the session ends."""
        gw = Gateway()
        client, session, pump = gw.dial()
        client.open_stream(Collector()).write(b"not a hello\n")
        # Only the server's side has run: refused, the close under way.
        pump.pump()
        self.assertIs(gw.control(session).state, ControlState.REFUSED)
        self.assertEqual(len(gw.factory.pending), 1)
        pump.flush()
        self.assertEqual(len(gw.factory.pending), 0)

    def test_newcomer_evicts_the_largest_source(self):
        """At the total, a newcomer takes back the oldest slot of the source
        holding the most, which is cut; the newcomer's hello passes."""
        gw = Gateway(max_pending_handshakes=4, max_pending_per_source=3)
        dials = [gw.dial("10.0.0.2") for _ in range(3)]
        gw.dial("10.0.0.3")
        client, session, pump = gw.dial("10.0.0.1")
        for _client, _session, p in dials:
            p.flush()
        self.assertTrue(dials[0][0].closed)
        self.assertFalse(dials[1][0].closed)
        self.assertEqual(gw.counters.limits, {Limit.PENDING_HANDSHAKES: 1})
        self.assertEqual(json.loads(hello(client, pump).data), {"ok": True})


class ControlChannelTests(SynchronousTestCase):
    """Stream 1 after the hello: kept open, health lines, bad lines, the end."""

    def setUp(self) -> None:
        self.gw = Gateway()
        self.client, self.session, self.pump = self.gw.dial()
        self.reply = Collector()
        self.stream = self.client.open_stream(self.reply)
        self.stream.write(encode_hello("TestClient1"))
        self.pump.flush()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def send(self, data: bytes) -> None:
        self.stream.write(data)
        self.pump.flush()

    def health(self, service: str = "web"):
        return self.gw.registry.health_for("TestClient1", service)

    def warnings(self) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_level") is LogLevel.warn
            and "control line" in e.get("log_format", "")
        ]

    def test_stream_one_stays_open(self):
        """The reply is written, and stream 1 stays open both ways (no FIN)."""
        self.assertEqual(json.loads(self.reply.data), {"ok": True})
        self.assertFalse(self.reply.read_closed)
        self.assertIsNone(self.reply.lost)
        self.assertIn(1, self.session.streams)
        self.assertIn(1, self.client.streams)

    def test_health_reported(self):
        """A health line sets each service's health and detail, at once."""
        self.send(
            encode_health({"web": False, "db": True}, {"web": "connection refused"})
        )
        web = self.health("web")
        self.assertEqual((web.connected, web.healthy), (True, False))
        self.assertEqual(web.reason, "service web unhealthy: connection refused")
        self.assertTrue(self.health("db").healthy)
        self.send(encode_health({"web": True}))
        self.assertTrue(self.health("web").healthy)
        self.assertEqual(self.warnings(), [])

    def test_hello_and_health_in_one_write(self):
        """A health line right behind the hello, in the same chunk, counts."""
        gw = Gateway()
        client, session, pump = gw.dial()
        stream = client.open_stream(Collector())
        stream.write(encode_hello("A") + encode_health({"web": False}))
        pump.flush()
        self.assertFalse(gw.registry.health_for("A", "web").healthy)

    def test_health_in_pieces(self):
        """A line split byte by byte is read whole."""
        for byte in encode_health({"web": False}):
            self.stream.write(bytes([byte]))
            self.pump.flush()
        self.assertFalse(self.health().healthy)

    def test_unknown_kind_and_keys_ignored(self):
        """A message of another kind, or extra keys, change nothing and warn not."""
        self.send(b'{"notice": "hello"}\n')
        self.send(b'{"health": {"web": false}, "later": 1}\n')
        self.assertFalse(self.health().healthy)
        self.assertEqual(self.warnings(), [])

    def test_malformed_lines_ignored_logged_once_a_minute(self):
        """Bad lines change nothing; one warning per minute at most per session."""
        self.send(encode_health({"web": False}))
        for line in (b"not json\n", b"[1]\n", b'{"health": {"web": 1}}\n'):
            self.send(line)
        self.assertFalse(self.health().healthy)
        self.assertTrue(self.gw.registry.is_connected("TestClient1"))
        self.assertEqual(len(self.warnings()), 1)
        self.gw.clock.advance(MALFORMED_LOG_INTERVAL)
        self.send(b"still not json\n")
        warnings = self.warnings()
        self.assertEqual(len(warnings), 2)
        self.assertIn("2 more not logged", warnings[1])

    def test_over_long_line_resets_stream_one(self):
        """A line over MAX_LINE resets stream 1; the health stays, the session
        stays up."""
        self.send(encode_health({"web": False}))
        self.send(b"x" * MAX_LINE)
        self.assertIn(1, self.session.streams)
        self.send(b"x")
        self.assertNotIn(1, self.session.streams)
        self.assertIsNotNone(self.reply.lost)
        self.assertFalse(self.health().healthy)
        self.assertTrue(self.gw.registry.is_connected("TestClient1"))
        self.assertEqual(len(self.warnings()), 1)

    def test_line_of_max_length_accepted(self):
        """A line of exactly MAX_LINE bytes is read (then judged as JSON)."""
        line = b'{"pad": "' + b"p" * (MAX_LINE - 11) + b'"}'
        self.assertEqual(len(line), MAX_LINE)
        self.send(line + b"\n")
        self.assertIn(1, self.session.streams)
        self.assertEqual(self.warnings(), [])

    def test_client_closes_control_channel(self):
        """The client closing stream 1 keeps the session and the last health."""
        self.send(encode_health({"web": False}))
        self.stream.loseConnection()
        self.pump.flush()
        self.assertTrue(self.gw.registry.is_connected("TestClient1"))
        self.assertFalse(self.health().healthy)

    def test_health_forgotten_when_the_session_ends(self):
        """The session's end forgets its health."""
        self.send(encode_health({"web": False}))
        self.client.close()
        self.pump.flush()
        self.assertEqual(self.health().reason, "not connected")
        self.assertEqual(self.gw.registry.snapshot()["TestClient1"]["Health"], {})

    def test_our_go_away_closes_stream_one(self):
        """The gateway's Go Away closes stream 1 first; a client that closes
        its side too ends the session at once, without waiting."""
        control = self.gw.control(self.session)
        control.go_away()
        self.pump.flush()
        self.assertTrue(self.reply.read_closed)
        # The client's side closes on the FIN, as a line reader does.
        self.stream.loseConnection()
        self.pump.flush()
        self.assertTrue(self.session.closed)
        self.assertTrue(self.client.closed)

    def test_client_go_away_closes_stream_one(self):
        """After the client's Go Away the gateway closes stream 1 so that the
        session ends with the users' streams."""
        self.client.go_away()
        self.pump.flush()
        self.assertTrue(self.reply.read_closed)
        self.assertEqual(self.health().reason, "going away")
        self.stream.loseConnection()
        self.pump.flush()
        self.assertTrue(self.session.closed)
        self.assertEqual(self.health().reason, "not connected")

    def test_replaced_session_retired(self):
        """A newer session of the same client closes the older one's stream 1."""
        client2, session2, pump2 = self.gw.dial()
        hello(client2, pump2)
        self.pump.flush()
        self.assertTrue(self.reply.read_closed)
        self.stream.loseConnection()
        self.pump.flush()
        self.assertTrue(self.session.closed)
        self.assertIs(self.gw.registry.session_for("TestClient1"), session2)

    def test_old_session_health_ignored(self):
        """Lines on a replaced session's stream 1 no longer speak for the client."""
        client2, session2, pump2 = self.gw.dial()
        hello(client2, pump2)
        # The old stream 1 is closing (FIN sent) but the old session may still
        # send before it sees it.
        self.gw.registry.health_reported(
            "TestClient1", self.session, Health({"web": False})
        )
        self.assertTrue(self.health().healthy)

    def test_gateway_id_in_reply(self):
        """With a gateway id set, the hello reply carries it."""
        gw = Gateway(gateway_id="eu-1")
        client, session, pump = gw.dial()
        self.assertEqual(
            json.loads(hello(client, pump).data), {"ok": True, "gateway": "eu-1"}
        )
