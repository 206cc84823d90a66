"""The server's control connections in memory: handshake, identity, registry."""

from __future__ import annotations

import json
import os

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.server.routes import parse_tunnels
from threshold.server.service import (
    STATE_CLOSED,
    STATE_CONNECTED,
    STATE_ERROR,
    ControlSettings,
    StateFileError,
    TunnelServer,
    read_state,
    write_state,
)
from threshold.testing import Collector
from threshold.wire.handshake import encode_hello


def make_server(clock: Clock, **settings) -> TunnelServer:
    config = SessionConfig(keepalive_interval=0)
    return TunnelServer(
        lambda host, port, factory: succeed(None),
        clock,
        ControlSettings(session=config, **settings),
    )


def dial(server: TunnelServer, clock: Clock):
    """A raw client session connected in memory to the server's factory."""
    factory = server.control_factory()
    client, session, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(None),
        lambda: MuxSession(
            client=True,
            clock=clock,
            handler=StreamAcceptor(lambda s: Collector()),
            config=SessionConfig(keepalive_interval=0),
        ),
        clock=clock,
    )
    return client, session, pump


def hello(client: MuxSession, pump, client_id: str = "TestClient1") -> Collector:
    reply = Collector()
    stream = client.open_stream(reply)
    stream.write(encode_hello(client_id))
    pump.flush()
    return reply


class HandshakeTests(SynchronousTestCase):
    def test_hello_accepted(self):
        """A valid hello is answered ok and the client is connected."""
        clock = Clock()
        server = make_server(clock)
        client, session, pump = dial(server, clock)
        reply = hello(client, pump)
        self.assertEqual(json.loads(reply.data), {"ok": True})
        self.assertTrue(server.registry.is_connected("TestClient1"))
        snapshot = server.registry.snapshot()["TestClient1"]
        self.assertEqual(snapshot["CurrentState"], STATE_CONNECTED)
        self.assertEqual(snapshot["LastState"], "ClientUnknown")

    def test_bad_hello_refused(self):
        """A hello that is not JSON gets ok false with the reason, then Go Away."""
        clock = Clock()
        server = make_server(clock)
        client, session, pump = dial(server, clock)
        reply = Collector()
        client.open_stream(reply).write(b"hello there\n")
        pump.flush()
        answer = json.loads(reply.data)
        self.assertFalse(answer["ok"])
        self.assertIn("JSON", answer["error"])
        self.assertTrue(client.closed)
        self.assertEqual(server.handshake_failures, 1)
        self.assertEqual(server.registry.snapshot(), {})

    def test_hello_timeout(self):
        """No hello within the timeout closes the connection."""
        clock = Clock()
        server = make_server(clock, handshake_timeout=5)
        client, session, pump = dial(server, clock)
        clock.advance(4.9)
        pump.flush()
        self.assertFalse(client.closed)
        clock.advance(0.2)
        pump.flush()
        self.assertTrue(client.closed)
        self.assertEqual(server.handshake_failures, 1)

    def test_streams_before_hello_refused(self):
        """Until the hello is accepted, no stream other than 1 is accepted."""
        clock = Clock()
        server = make_server(clock)
        client, session, pump = dial(server, clock)
        client._next_id = 3  # skip stream 1
        other = Collector()
        client.open_stream(other).write(b"x")
        pump.flush()
        self.assertIsNotNone(other.lost)
        self.assertEqual(server.registry.snapshot(), {})

    def test_client_streams_after_hello_refused(self):
        """Client-opened streams other than 1 are reserved, so refused."""
        clock = Clock()
        server = make_server(clock)
        client, session, pump = dial(server, clock)
        hello(client, pump)
        other = Collector()
        client.open_stream(other).write(b"x")
        pump.flush()
        self.assertIsNotNone(other.lost)
        self.assertTrue(server.registry.is_connected("TestClient1"))

    def test_identity_required_with_tls(self):
        """With TLS, a transport without a certificate cannot pass the hello."""
        clock = Clock()
        server = make_server(clock, use_tls=True)
        client, session, pump = dial(server, clock)
        reply = hello(client, pump)
        answer = json.loads(reply.data)
        self.assertFalse(answer["ok"])
        self.assertIn("does not match the certificate", answer["error"])

    def test_server_full(self):
        """Past MaxClients, new client ids are refused; known ones are not."""
        clock = Clock()
        server = make_server(clock, max_clients=1)
        c1, _, p1 = dial(server, clock)
        hello(c1, p1, "A")
        c2, _, p2 = dial(server, clock)
        reply = hello(c2, p2, "B")
        self.assertIn("server full", json.loads(reply.data)["error"])
        c3, _, p3 = dial(server, clock)
        reply = hello(c3, p3, "A")
        self.assertEqual(json.loads(reply.data), {"ok": True})

    def test_newest_connection_wins(self):
        """A second connection of the same ClientId replaces the first."""
        clock = Clock()
        server = make_server(clock)
        c1, s1, p1 = dial(server, clock)
        hello(c1, p1)
        c2, s2, p2 = dial(server, clock)
        hello(c2, p2)
        p1.flush()
        self.assertIs(server.registry.session_for("TestClient1"), s2)
        # The old one got Go Away: it refuses new streams and closes once its
        # last stream is done (here stream 1, reset after the linger time).
        self.assertTrue(c1._remote_go_away)
        clock.advance(s1.config.stream_linger + 1)
        p1.flush()
        self.assertTrue(c1.closed)
        # The old session's end does not disconnect the new one.
        self.assertTrue(server.registry.is_connected("TestClient1"))
        self.assertEqual(
            server.registry.snapshot()["TestClient1"]["CurrentState"],
            STATE_CONNECTED,
        )

    def test_states_on_close_and_error(self):
        """A clean end is ClientClosed; a lost connection is ClientError."""
        clock = Clock()
        server = make_server(clock)
        c1, s1, p1 = dial(server, clock)
        hello(c1, p1)
        c1.close()
        p1.flush()
        state = server.registry.snapshot()["TestClient1"]
        self.assertEqual(
            (state["CurrentState"], state["LastState"]),
            (STATE_CLOSED, STATE_CONNECTED),
        )
        c2, s2, p2 = dial(server, clock)
        hello(c2, p2)
        s2.connectionLost(Failure(ConnectionLostForTest("reset")))
        state = server.registry.snapshot()["TestClient1"]
        self.assertEqual(state["CurrentState"], STATE_ERROR)
        self.assertIn("reset", state["LastError"])


class ConnectionLostForTest(Exception):
    pass


class StateFileTests(SynchronousTestCase):
    def test_round_trip(self):
        """A written tunnel set reads back equal."""
        path = os.path.join(self.mktemp() + "-state.json")
        tunnels = parse_tunnels(
            [
                {"ClientId": "a", "ListenPort": 9000, "BackEndService": "s"},
                {
                    "ClientId": "b",
                    "ListenAddress": "::1",
                    "ListenPort": 9001,
                    "ListenHostnameGlob": "*.example.com",
                    "BackEndService": "t",
                    "HaProxyProxyProtocol": True,
                    "HaProxyProxyProtocolVersion": 2,
                },
            ]
        )
        write_state(path, tunnels)
        self.assertEqual(read_state(path), tunnels)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_corrupt_state_file(self):
        """A state file that is not a tunnel list is a clear error."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("{not json")
        with self.assertRaisesRegex(StateFileError, "not valid JSON"):
            read_state(path)
        with open(path, "w") as f:
            json.dump([{"ClientId": "a"}], f)
        with self.assertRaisesRegex(StateFileError, "ListenPort"):
            read_state(path)


class LimitAndStopTests(SynchronousTestCase):
    def test_pending_handshakes_limited(self):
        """Past MaxPendingHandshakes, new control connections are refused."""
        clock = Clock()
        server = make_server(clock, max_pending_handshakes=2)
        factory = server.control_factory()
        self.assertIsNotNone(factory.buildProtocol(None))
        self.assertIsNotNone(factory.buildProtocol(None))
        self.assertIsNone(factory.buildProtocol(None))
        self.assertEqual(server.limits_hit["pending_handshakes"], 1)

    def test_accepted_clients_do_not_count_as_pending(self):
        """Clients past the hello free their pending slot."""
        clock = Clock()
        server = make_server(clock, max_pending_handshakes=1)
        client, session, pump = dial(server, clock)
        hello(client, pump)
        self.assertIsNotNone(server.control_factory().buildProtocol(None))

    def test_graceful_stop_lets_streams_finish(self):
        """On stop, running streams may finish; then the sessions close."""
        clock = Clock()
        server = make_server(clock)
        server.shutdown_grace = 10
        client, session, pump = dial(server, clock)
        hello(client, pump)
        user = Collector()
        stream = session.open_stream(user)
        pump.flush()
        server.startService()
        stopped = server.stopService()
        pump.flush()
        self.assertNoResult(stopped)
        self.assertFalse(client.closed)
        stream.write(b"last words")
        stream.loseConnection()
        for c in list(client.streams.values()):
            c.loseConnection()
        pump.flush()
        self.successResultOf(stopped)
        self.assertTrue(client.closed)

    def test_graceful_stop_cuts_after_grace(self):
        """Connections still running after the grace period are cut."""
        clock = Clock()
        server = make_server(clock)
        server.shutdown_grace = 10
        client, session, pump = dial(server, clock)
        hello(client, pump)
        session.open_stream(Collector())
        pump.flush()
        server.startService()
        stopped = server.stopService()
        pump.flush()
        clock.advance(9)
        pump.flush()
        self.assertNoResult(stopped)
        clock.advance(2)
        pump.flush()
        self.successResultOf(stopped)
        self.assertTrue(client.closed)
