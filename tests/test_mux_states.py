"""Tests for the stream and session states and their transitions."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux import states
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.mux.states import (
    ENDED,
    SESSION_TRANSITIONS,
    STREAM_TRANSITIONS,
    SessionEvent,
    SessionState,
    StreamEvent,
    StreamState,
)
from threshold.testing import Collector, Echo, connected_sessions, decode_frames
from threshold.wire import frames as F

S = StreamState
MUX = Path(__file__).resolve().parent.parent / "threshold" / "mux"


class TableTests(SynchronousTestCase):
    def test_every_state_reachable(self):
        """Every stream state can be reached from INIT or SYN_RECEIVED."""
        seen = {S.INIT, S.SYN_RECEIVED}
        frontier = list(seen)
        while frontier:
            state = frontier.pop()
            for (start, _), end in STREAM_TRANSITIONS.items():
                if start is state and end not in seen:
                    seen.add(end)
                    frontier.append(end)
        self.assertEqual(seen, set(StreamState))

    def test_ended_is_final(self):
        """No event leads out of an ended stream; every live state can end."""
        for (start, event), _ in STREAM_TRANSITIONS.items():
            self.assertNotIn(start, ENDED, (start, event))
        for state in set(StreamState) - ENDED:
            self.assertIs(states.stream_next(state, StreamEvent.RESET), S.RESET)
            self.assertIs(states.stream_next(state, StreamEvent.SESSION_LOST), S.LOST)

    def test_events_that_do_not_apply(self):
        """A second FIN, a close after close: no transition."""
        self.assertIsNone(states.stream_next(S.REMOTE_CLOSE, StreamEvent.FIN_RECEIVED))
        self.assertIsNone(states.stream_next(S.LOCAL_CLOSE, StreamEvent.CLOSE_WRITE))
        self.assertIsNone(states.stream_next(S.CLOSED, StreamEvent.CLOSE))

    def test_session_table(self):
        """The session only moves forward and always reaches CLOSED."""
        order = list(SessionState)
        for (start, _), end in SESSION_TRANSITIONS.items():
            self.assertGreater(order.index(end), order.index(start))
        for state in set(SessionState) - {SessionState.CLOSED}:
            self.assertIs(
                states.session_next(state, SessionEvent.CONNECTION_LOST),
                SessionState.CLOSED,
            )

    def test_no_boolean_state_flags(self):
        """The stream and session keep their life in ``state`` alone: none of
        the flags the state replaced is assigned any more."""
        gone = {
            "_write_closing",
            "_fin_sent",
            "_remote_fin",
            "_remote_fin_delivered",
            "_lost_called",
            "_closing",
            "_pending_flags",
            "_going_away",
            "_remote_go_away",
        }
        for name in ("stream.py", "session.py"):
            tree = ast.parse((MUX / name).read_text())
            assigned = {
                node.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            }
            self.assertEqual(assigned & gone, set(), name)

    def test_stream_module_does_not_import_session(self):
        """stream.py depends on the StreamSession seam, not on session.py."""
        tree = ast.parse((MUX / "stream.py").read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        }
        self.assertNotIn("threshold.mux.session", imported)
        self.assertIn("threshold.mux.interfaces", imported)


class StreamLifeTests(SynchronousTestCase):
    def test_opened_locally(self):
        """SYN goes out: SYN_SENT; the peer's ACK: ESTABLISHED."""
        client, server, pump = connected_sessions(accept_on_server=lambda s: Echo())
        stream = client.open_stream(Collector())
        self.assertIs(stream.state, S.SYN_SENT)
        remote = server.streams.get(stream.id)
        self.assertIsNone(remote)
        pump.flush()
        self.assertIs(server.streams[stream.id].state, S.ESTABLISHED)
        self.assertIs(stream.state, S.ESTABLISHED)

    def test_half_closes_then_closed(self):
        """FIN one way, then the other: LOCAL_CLOSE, CLOSING, CLOSED."""
        peer = Collector()
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        mine = Collector()
        stream = client.open_stream(mine)
        pump.flush()
        stream.loseWriteConnection()
        self.assertIs(stream.state, S.LOCAL_CLOSE)
        pump.flush()
        remote = peer.transport
        self.assertIs(remote.state, S.REMOTE_CLOSE)
        self.assertTrue(peer.read_closed)
        remote.write(b"after your FIN")
        remote.loseWriteConnection()
        self.assertIs(remote.state, S.CLOSED)
        pump.flush()
        self.assertIs(stream.state, S.CLOSED)
        self.assertEqual(mine.data, b"after your FIN")
        mine.lost.trap(ConnectionDone)
        self.assertFalse(stream.cut_short)

    def test_closing_while_paused_waits_for_the_reader(self):
        """Both FINs exchanged while the reader is paused: CLOSING until it
        has read everything, then CLOSED."""
        peer = Collector(pause_on_connect=True)
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        stream = client.open_stream(Collector())
        stream.write(b"queued")
        stream.loseWriteConnection()
        pump.flush()
        remote = peer.transport
        remote.loseWriteConnection()
        self.assertIs(remote.state, S.CLOSING)
        self.assertIsNone(peer.lost)
        remote.resumeProducing()
        self.assertEqual(peer.data, b"queued")
        self.assertIs(remote.state, S.CLOSED)
        peer.lost.trap(ConnectionDone)

    def test_lose_connection_lingers(self):
        """loseConnection before the peer's FIN: LINGERING, then CLOSED."""
        peer = Collector()
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        stream = client.open_stream(Collector())
        pump.flush()
        stream.loseConnection()
        self.assertIs(stream.state, S.LINGERING)
        self.assertTrue(stream.disconnecting)
        pump.flush()
        peer.transport.write(b"dropped")
        peer.transport.loseWriteConnection()
        pump.flush()
        self.assertIs(stream.state, S.CLOSED)

    def test_session_lost_marks_cut_short(self):
        """A stream whose session ends under it is LOST (cut short)."""
        client, server, pump = connected_sessions(
            accept_on_server=lambda s: Collector()
        )
        mine = Collector()
        stream = client.open_stream(mine)
        pump.flush()
        client.transport.loseConnection()
        pump.flush()
        self.assertIs(stream.state, S.LOST)
        self.assertTrue(stream.cut_short)
        self.assertTrue(stream.closed)

    def test_close_inside_stream_opened_still_acks(self):
        """A handler that closes the stream before returning its protocol:
        the first frame still carries the ACK, then the FIN."""
        clock = Clock()

        def accept(stream):
            stream.loseWriteConnection()
            return Collector()

        session = MuxSession(
            client=False,
            clock=clock,
            handler=StreamAcceptor(accept),
            config=SessionConfig(keepalive_interval=0),
        )
        transport = StringTransport()
        session.makeConnection(transport)
        session.dataReceived(F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0))
        flags = [f.flags for f in decode_frames(transport.value())]
        self.assertTrue(flags[0] & F.FLAG_ACK)
        self.assertTrue(any(f & F.FLAG_FIN for f in flags))


class SessionLifeTests(SynchronousTestCase):
    def test_states(self):
        """OPEN; the peer's Go Away: PEER_GOING_AWAY; ours: GOING_AWAY;
        the last stream ends: CLOSING; the connection goes: CLOSED."""
        peer = Collector()
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        stream = client.open_stream(Collector())
        pump.flush()
        self.assertIs(client.state, SessionState.OPEN)
        server.go_away()
        self.assertIs(server.state, SessionState.GOING_AWAY)
        pump.flush()
        self.assertIs(client.state, SessionState.PEER_GOING_AWAY)
        client.go_away()
        self.assertIs(client.state, SessionState.GOING_AWAY)
        stream.abortConnection()
        self.assertIs(client.state, SessionState.CLOSING)
        pump.flush()
        self.assertTrue(client.closed)
        self.assertIs(server.state, SessionState.CLOSED)

    def test_connection_lost_without_reason(self):
        """connectionLost() with no argument ends the session cleanly (its
        default is a Failure, not the exception class)."""
        session = MuxSession(
            client=True,
            clock=Clock(),
            handler=StreamAcceptor(lambda s: None),
            config=SessionConfig(keepalive_interval=0),
        )
        session.makeConnection(StringTransport())
        mine = Collector()
        session.open_stream(mine)
        ended = []
        session.when_closed().addCallback(ended.append)
        session.connectionLost()
        self.assertIsInstance(ended[0], ConnectionDone)
        mine.lost.trap(ConnectionDone)
        self.assertTrue(session.closed)

    def test_plain_protocol_stream(self):
        """A protocol without half-close: the peer's FIN closes the stream."""
        plain = Protocol()
        client, server, pump = connected_sessions(accept_on_server=lambda s: plain)
        stream = client.open_stream(Collector())
        stream.loseWriteConnection()
        pump.flush()
        self.assertIs(stream.state, S.CLOSED)
        self.assertEqual(server.streams, {})
