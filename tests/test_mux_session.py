"""Tests for the yamux session and streams."""

from __future__ import annotations

import hashlib
import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import (
    INITIAL_WINDOW,
    KeepaliveTimeout,
    MuxSession,
    ProtocolViolation,
    SessionClosed,
    SessionConfig,
    StreamLimitReached,
)
from threshold.mux.stream import StreamReset
from threshold.testing import (
    Collector,
    Echo,
    Frame,
    connected_sessions,
    decode_frames,
)
from threshold.wire import frames as F


def string_session(
    client: bool = True, config: SessionConfig | None = None, accept=None
) -> tuple[MuxSession, StringTransport, Clock]:
    """A session over a StringTransport, to feed and read raw frames."""
    clock = Clock()
    session = MuxSession(
        client=client,
        clock=clock,
        handler=StreamAcceptor(accept or (lambda s: Collector())),
        config=config or SessionConfig(keepalive_interval=0),
    )
    transport = StringTransport()
    session.makeConnection(transport)
    return session, transport, clock


def rtt_session(
    rtt: float, client: bool = False, accept=None, **config
) -> tuple[MuxSession, StringTransport, Clock]:
    """A string session whose first Ping the peer answered after ``rtt``."""
    config.setdefault("keepalive_interval", 30)
    session, transport, clock = string_session(
        client=client, config=SessionConfig(**config), accept=accept
    )
    [ping] = sent_frames(transport)
    clock.advance(rtt)
    session.dataReceived(F.encode_header(F.TYPE_PING, F.FLAG_ACK, 0, ping.length))
    assert session.min_rtt == rtt
    return session, transport, clock


def sent_frames(transport: StringTransport) -> list[Frame]:
    frames = decode_frames(transport.value())
    transport.clear()
    return frames


class StreamLifecycleTests(SynchronousTestCase):
    def test_open_write_echo_half_close(self):
        """Bytes flow both ways; half-close each way; then the stream ends."""
        client, server, pump = connected_sessions(accept_on_server=lambda s: Echo())
        mine = Collector()
        stream = client.open_stream(mine)
        self.assertEqual(stream.id % 2, 1)
        stream.write(b"hello ")
        stream.writeSequence([b"wor", b"ld"])
        pump.flush()
        self.assertEqual(mine.data, b"hello world")
        self.assertEqual(len(server.streams), 1)
        stream.loseWriteConnection()
        pump.flush()
        self.assertTrue(mine.read_closed)
        mine.transport.loseWriteConnection()
        pump.flush()
        self.assertIsNotNone(mine.lost)
        mine.lost.trap(ConnectionDone)
        self.assertEqual(client.streams, {})
        self.assertEqual(server.streams, {})

    def test_server_opens_even_streams(self):
        """The accepting side opens even ids, accepted by the dialer."""
        got = []

        def accept(stream):
            got.append(Collector())
            return got[-1]

        client, server, pump = connected_sessions(accept_on_client=accept)
        s1 = server.open_stream(Collector())
        s2 = server.open_stream(Collector())
        s1.write(b"a")
        s2.write(b"b")
        pump.flush()
        self.assertEqual((s1.id, s2.id), (2, 4))
        self.assertEqual([c.data for c in got], [b"a", b"b"])

    def test_data_before_ack(self):
        """Data written right after open travels with no wait for the ACK."""
        client, server, pump = connected_sessions(
            accept_on_server=lambda s: Collector()
        )
        stream = client.open_stream(Collector())
        stream.write(b"early")
        frames = decode_frames(pump.clientIO.getOutBuffer())
        self.assertEqual(frames[0].type, F.TYPE_WINDOW_UPDATE)
        self.assertEqual(frames[0].flags, F.FLAG_SYN)
        self.assertEqual(frames[1].payload, b"early")

    def test_lose_connection_non_half_closeable(self):
        """A peer FIN to a plain protocol closes the stream gracefully."""
        from twisted.internet.protocol import Protocol

        class Plain(Protocol):
            lost = None

            def connectionLost(self, reason):
                self.lost = reason

        plain = Plain()
        client, server, pump = connected_sessions(accept_on_server=lambda s: plain)
        mine = Collector()
        stream = client.open_stream(mine)
        stream.loseWriteConnection()
        pump.flush()
        plain.lost.trap(ConnectionDone)
        self.assertTrue(mine.read_closed)
        mine.lost.trap(ConnectionDone)

    def test_lose_connection_lingers_then_resets(self):
        """loseConnection waits for the peer's FIN, then resets after linger."""
        clock = Clock()
        peer = Collector()
        client, server, pump = connected_sessions(
            accept_on_server=lambda s: peer, clock=clock
        )
        mine = Collector()
        stream = client.open_stream(mine)
        stream.write(b"x")
        stream.loseConnection()
        pump.flush()
        self.assertTrue(peer.read_closed)
        self.assertIsNone(mine.lost)
        clock.advance(client.config.stream_linger + 1)
        pump.flush()
        mine.lost.trap(ConnectionAborted)
        peer.lost.trap(StreamReset)

    def test_reset_both_ways(self):
        """abortConnection sends RST; the peer's protocol sees StreamReset."""
        peer = Collector()
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        mine = Collector()
        stream = client.open_stream(mine)
        stream.write(b"x")
        pump.flush()
        stream.abortConnection()
        pump.flush()
        mine.lost.trap(ConnectionAborted)
        peer.lost.trap(StreamReset)
        self.assertEqual(server.streams, {})

    def test_refused_stream(self):
        """A stream the application refuses is reset for the opener."""
        client, server, pump = connected_sessions(accept_on_server=lambda s: None)
        mine = Collector()
        client.open_stream(mine)
        pump.flush()
        mine.lost.trap(StreamReset)
        self.assertEqual(server.streams_refused, 1)

    def test_protocol_exception_resets_only_its_stream(self):
        """A protocol that raises loses its stream; the session lives on."""
        from twisted.internet.protocol import Protocol

        class Broken(Protocol):
            def dataReceived(self, data):
                raise RuntimeError("boom")

        protocols = [Broken(), Echo()]
        client, server, pump = connected_sessions(
            accept_on_server=lambda s: protocols.pop(0)
        )
        bad, good = Collector(), Collector()
        client.open_stream(bad).write(b"1")
        client.open_stream(good).write(b"2")
        pump.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        bad.lost.trap(StreamReset)
        self.assertEqual(good.data, b"2")
        self.assertFalse(client.closed)

    def test_session_loss_ends_streams(self):
        """When the connection goes, every stream's protocol is told."""
        client, server, pump = connected_sessions(
            accept_on_server=lambda s: Collector()
        )
        mine = [Collector() for _ in range(3)]
        for m in mine:
            client.open_stream(m)
        pump.flush()
        client.transport.loseConnection()
        pump.flush()
        for m in mine:
            self.assertIsNotNone(m.lost)
        self.assertTrue(server.closed)


class ManyStreamsTests(SynchronousTestCase):
    def test_concurrent_streams_checksums(self):
        """Many streams interleaved both ways arrive intact, each to its own."""
        client, server, pump = connected_sessions(accept_on_server=lambda s: Echo())
        rnd = random.Random(7)
        payloads = [os.urandom(rnd.randrange(1, 600_000)) for _ in range(40)]
        collectors = [Collector() for _ in payloads]
        streams = [client.open_stream(c) for c in collectors]
        # Interleave writes in random pieces across streams.
        offsets = [0] * len(payloads)
        while any(o < len(p) for o, p in zip(offsets, payloads, strict=True)):
            i = rnd.randrange(len(payloads))
            if offsets[i] >= len(payloads[i]):
                continue
            n = rnd.randrange(1, 70_000)
            streams[i].write(payloads[i][offsets[i] : offsets[i] + n])
            offsets[i] += n
            if rnd.random() < 0.2:
                pump.pump()
        for s in streams:
            s.loseWriteConnection()
        pump.flush()
        for p, c in zip(payloads, collectors, strict=True):
            self.assertEqual(
                hashlib.sha256(c.data).digest(), hashlib.sha256(p).digest()
            )
            self.assertTrue(c.read_closed)


class FlowControlTests(SynchronousTestCase):
    def test_paused_reader_stops_sender_after_one_window(self):
        """A paused reader gets exactly one window; the rest waits at the sender."""
        peer = Collector(pause_on_connect=True)
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        producer = FakeProducer()
        mine = Collector()
        stream = client.open_stream(mine)
        stream.registerProducer(producer, True)
        data = os.urandom(3 * INITIAL_WINDOW)
        stream.write(data)
        pump.flush()
        remote = server.streams[stream.id]
        self.assertEqual(remote.buffered(), (0, INITIAL_WINDOW))
        self.assertEqual(stream.buffered(), (2 * INITIAL_WINDOW, 0))
        self.assertEqual(peer.data, b"")
        self.assertTrue(producer.paused)
        remote.resumeProducing()
        pump.flush()
        self.assertEqual(peer.data, data)
        self.assertEqual(stream.buffered(), (0, 0))
        self.assertFalse(producer.paused)

    def test_pausing_reader_midway(self):
        """Pausing stops window grants; resuming delivers everything in order."""
        peer = Collector()
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        stream = client.open_stream(Collector())
        data = os.urandom(5 * INITIAL_WINDOW)
        stream.write(data[: INITIAL_WINDOW // 4])
        pump.flush()
        remote = server.streams[stream.id]
        remote.pauseProducing()
        stream.write(data[INITIAL_WINDOW // 4 :])
        pump.flush()
        held = remote.buffered()[1]
        self.assertLessEqual(held, INITIAL_WINDOW)
        self.assertGreater(held, 0)
        remote.resumeProducing()
        pump.flush()
        self.assertEqual(peer.data, data)

    def test_fin_waits_behind_paused_data(self):
        """A FIN received while paused is delivered after the data."""
        peer = Collector(pause_on_connect=True)
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        stream = client.open_stream(Collector())
        stream.write(b"abc")
        stream.loseWriteConnection()
        pump.flush()
        self.assertFalse(peer.read_closed)
        server.streams[stream.id].resumeProducing()
        self.assertEqual(peer.data, b"abc")
        self.assertTrue(peer.read_closed)

    def test_slow_stream_does_not_block_others(self):
        """A stalled stream leaves the other streams of the session flowing."""
        readers = [Collector(pause_on_connect=True), Collector()]
        client, server, pump = connected_sessions(
            accept_on_server=lambda s: readers.pop(0)
        )
        fast_peer = readers[1]
        slow = client.open_stream(Collector())
        fast = client.open_stream(Collector())
        slow.write(os.urandom(2 * INITIAL_WINDOW))
        data = os.urandom(4 * INITIAL_WINDOW)
        fast.write(data)
        fast.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.streams[slow.id].buffered(), (0, INITIAL_WINDOW))
        self.assertEqual(slow.buffered(), (INITIAL_WINDOW, 0))
        self.assertEqual(fast_peer.data, data)
        self.assertTrue(fast_peer.read_closed)

    def test_transport_backpressure_pauses_streams(self):
        """A full transport holds stream data and pauses stream producers."""
        session, transport, clock = string_session()
        stream = session.open_stream(Collector())
        producer = FakeProducer()
        stream.registerProducer(producer, True)
        sent_frames(transport)
        transport.producer.pauseProducing()
        stream.write(b"held")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(producer.paused)
        transport.producer.resumeProducing()
        frames = sent_frames(transport)
        self.assertEqual([f.payload for f in frames], [b"held"])
        self.assertFalse(producer.paused)

    def test_producer_registered_while_blocked_is_resumed(self):
        """A producer paused for a full transport resumes when it drains."""
        session, transport, clock = string_session()
        stream = session.open_stream(Collector())
        transport.producer.pauseProducing()
        producer = FakeProducer()
        stream.registerProducer(producer, True)
        self.assertTrue(producer.paused)
        transport.producer.resumeProducing()
        self.assertFalse(producer.paused)

    def test_window_grows_for_fast_reader(self):
        """A reader draining windows within the RTT earns doubled windows."""
        session, transport, clock = rtt_session(0.1)
        session.dataReceived(F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0))
        chunk = b"x" * (INITIAL_WINDOW // 2)
        grants = []
        for _ in range(12):
            session.dataReceived(F.encode_header(F.TYPE_DATA, 0, 1, len(chunk)) + chunk)
            grants += [f.length for f in sent_frames(transport) if f.stream_id == 1]
        grants = [g for g in grants if g]
        self.assertEqual(grants[0], INITIAL_WINDOW // 2 + INITIAL_WINDOW)
        self.assertGreater(session.streams[1].receive_window(), 4 * INITIAL_WINDOW)

    def test_window_stays_for_slow_reader(self):
        """A reader slower than the RTT keeps the initial window."""
        session, transport, clock = rtt_session(0.01)
        session.dataReceived(F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0))
        chunk = b"x" * (INITIAL_WINDOW // 2)
        for _ in range(6):
            clock.advance(1)
            session.dataReceived(F.encode_header(F.TYPE_DATA, 0, 1, len(chunk)) + chunk)
        self.assertEqual(session.streams[1].receive_window(), INITIAL_WINDOW)

    def test_window_capped_at_maximum(self):
        """Growth never passes the configured maximum window."""
        session, transport, clock = rtt_session(1.0, max_window=INITIAL_WINDOW * 2)
        session.dataReceived(F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0))
        chunk = b"x" * (INITIAL_WINDOW // 2)
        for _ in range(10):
            session.dataReceived(F.encode_header(F.TYPE_DATA, 0, 1, len(chunk)) + chunk)
        self.assertEqual(session.streams[1].receive_window(), 2 * INITIAL_WINDOW)


class FakeProducer:
    paused = False
    stopped = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True


class KeepaliveTests(SynchronousTestCase):
    def test_ping_answered(self):
        """A Ping SYN is answered by a Ping ACK with the same value."""
        session, transport, clock = string_session()
        session.dataReceived(F.encode_header(F.TYPE_PING, F.FLAG_SYN, 0, 1234))
        self.assertEqual(
            sent_frames(transport), [Frame(F.TYPE_PING, F.FLAG_ACK, 0, 1234)]
        )

    def test_rtt_measured_and_pings_repeat(self):
        """The answer to our Ping sets the RTT; the next Ping follows."""
        config = SessionConfig(keepalive_interval=5, keepalive_timeout=3)
        session, transport, clock = string_session(config=config)
        [ping] = sent_frames(transport)
        self.assertEqual((ping.type, ping.flags), (F.TYPE_PING, F.FLAG_SYN))
        clock.advance(0.25)
        session.dataReceived(F.encode_header(F.TYPE_PING, F.FLAG_ACK, 0, ping.length))
        self.assertEqual(session.rtt, 0.25)
        clock.advance(10)  # past the old timeout: the answer cancelled it
        self.assertFalse(transport.disconnecting)
        [ping2] = sent_frames(transport)
        self.assertNotEqual(ping2.length, ping.length)

    def test_silent_peer_is_dead(self):
        """No answer within the timeout closes the session as dead."""
        config = SessionConfig(keepalive_interval=5, keepalive_timeout=3)
        session, transport, clock = string_session(config=config)
        closed = []
        session.when_closed().addCallback(closed.append)
        clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        session.connectionLost(ConnectionDone())
        self.assertIsInstance(closed[0], KeepaliveTimeout)


class ViolationTests(SynchronousTestCase):
    def assert_violation(self, wire: bytes, message: str, client: bool = True):
        session, transport, clock = string_session(client=client)
        closed = []
        session.when_closed().addCallback(closed.append)
        sent_frames(transport)
        session.dataReceived(wire)
        frames = sent_frames(transport)
        self.assertIn(Frame(F.TYPE_GO_AWAY, 0, 0, F.GO_AWAY_PROTOCOL_ERROR), frames)
        self.assertTrue(transport.disconnecting)
        session.connectionLost(ConnectionDone())
        self.assertRegex(str(closed[0]), message)
        # Nothing more is processed after a violation.
        session.dataReceived(F.encode_header(F.TYPE_PING, F.FLAG_SYN, 0, 1))
        self.assertEqual(transport.value(), b"")

    def test_bad_version(self):
        """An unknown version ends the session with a protocol error."""
        self.assert_violation(b"\x02" + bytes(11), "version 2")

    def test_bad_type(self):
        """An unknown frame type ends the session with a protocol error."""
        self.assert_violation(b"\x00\x07" + bytes(10), "frame type 7")

    def test_data_past_window(self):
        """Data beyond the granted window is a protocol error."""
        wire = F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2, 0)
        wire += F.encode_header(F.TYPE_DATA, 0, 2, INITIAL_WINDOW + 1)
        self.assert_violation(wire, "past a window of 262144")

    def test_data_past_window_cumulative(self):
        """Several frames that together pass the window are a violation."""
        wire = F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2, 0)
        half = INITIAL_WINDOW // 2
        for _ in range(2):
            wire += F.encode_header(F.TYPE_DATA, 0, 2, half) + bytes(half)
        wire += F.encode_header(F.TYPE_DATA, 0, 2, 1)
        session, transport, clock = string_session(
            accept=lambda s: Collector(pause_on_connect=True)
        )
        session.dataReceived(wire)
        self.assertTrue(transport.disconnecting)

    def test_never_opened(self):
        """A frame for a stream that was never opened is a violation."""
        self.assert_violation(
            F.encode_header(F.TYPE_DATA, 0, 8, 1) + b"x", "stream 8, which was never"
        )

    def test_never_opened_local_parity(self):
        """A frame for one of our ids we never used is a violation."""
        self.assert_violation(
            F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_ACK, 5, 0), "never opened"
        )

    def test_wrong_parity(self):
        """The peer opening an id of our parity is a violation."""
        self.assert_violation(
            F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 3, 0), "our parity"
        )

    def test_reused_id(self):
        """Opening an id again is a violation."""
        wire = F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 4, 0)
        self.assert_violation(wire + wire, "reused stream id 4")

    def test_stream_zero(self):
        """Stream frames on stream 0 are a violation."""
        self.assert_violation(F.encode_header(F.TYPE_DATA, 0, 0, 0), "on stream 0")

    def test_frame_over_maximum(self):
        """A Data header over the maximum frame size is a violation."""
        wire = F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2, 0)
        wire += F.encode_header(F.TYPE_DATA, 0, 2, 17 * 1024 * 1024)
        self.assert_violation(wire, "exceeds the maximum")

    def test_ping_on_stream(self):
        """A Ping on a stream id is a violation."""
        self.assert_violation(F.encode_header(F.TYPE_PING, 1, 2, 0), "Ping on stream")

    @settings(max_examples=200)
    @given(st.binary(max_size=400))
    def test_garbage_never_raises(self, data):
        """Random bytes end in frames handled or a Go Away, never an exception."""
        session, transport, clock = string_session()
        session.dataReceived(data)
        self.assertEqual(self.flushLoggedErrors(), [])


class LimitTests(SynchronousTestCase):
    def test_remote_stream_limit(self):
        """Streams beyond the limit are reset; earlier ones keep working."""
        client, server, pump = connected_sessions(
            accept_on_server=lambda s: Echo(),
            server_config=SessionConfig(keepalive_interval=0, max_streams=2),
        )
        mine = [Collector() for _ in range(3)]
        streams = [client.open_stream(m) for m in mine]
        for s in streams:
            s.write(b"ping")
        pump.flush()
        self.assertEqual([m.data for m in mine[:2]], [b"ping", b"ping"])
        mine[2].lost.trap(StreamReset)

    def test_local_stream_limit(self):
        """Opening past the limit raises StreamLimitReached."""
        session, transport, clock = string_session(
            config=SessionConfig(keepalive_interval=0, max_streams=1)
        )
        session.open_stream(Collector())
        self.assertRaises(StreamLimitReached, session.open_stream, Collector())


class GoAwayTests(SynchronousTestCase):
    def test_go_away_normal_waits_for_streams(self):
        """Go Away refuses new streams and closes when the last one ends."""
        peer = Collector()
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        mine = Collector()
        stream = client.open_stream(mine)
        pump.flush()
        server.go_away()
        pump.flush()
        self.assertRaises(SessionClosed, client.open_stream, Collector())
        self.assertFalse(client.closed)
        stream.write(b"still works")
        stream.loseWriteConnection()
        peer.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(peer.data, b"still works")
        self.assertTrue(client.closed)
        self.assertTrue(server.closed)

    def test_go_away_error_closes_at_once(self):
        """Go Away with an error code closes the connection at once."""
        client, server, pump = connected_sessions(
            accept_on_server=lambda s: Collector()
        )
        closed = []
        client.when_closed().addCallback(closed.append)
        client.open_stream(Collector())
        pump.flush()
        server.go_away(F.GO_AWAY_INTERNAL_ERROR)
        pump.flush()
        self.assertTrue(client.closed)
        self.assertIn("internal error", str(closed[0]))

    def test_violation_type(self):
        """ProtocolViolation is what a violating peer's session ends with."""
        session, transport, clock = string_session()
        closed = []
        session.when_closed().addCallback(closed.append)
        session.dataReceived(b"\x09" * 12)
        session.connectionLost(ConnectionDone())
        self.assertIsInstance(closed[0], ProtocolViolation)


class WriteBacklogTests(SynchronousTestCase):
    def test_pings_coalesced_while_peer_not_reading(self):
        """While our transport is full, only the latest Ping is answered, later."""
        session, transport, clock = string_session()
        transport.producer.pauseProducing()
        for value in range(1000):
            session.dataReceived(F.encode_header(F.TYPE_PING, F.FLAG_SYN, 0, value))
        self.assertEqual(transport.value(), b"")
        transport.producer.resumeProducing()
        self.assertEqual(
            sent_frames(transport), [Frame(F.TYPE_PING, F.FLAG_ACK, 0, 999)]
        )

    def test_control_flood_without_reading_closes(self):
        """A peer that makes us write RSTs without reading is cut off."""
        config = SessionConfig(
            keepalive_interval=0, max_streams=1, max_control_backlog=1200
        )
        session, transport, clock = string_session(config=config)
        closed = []
        session.when_closed().addCallback(closed.append)
        transport.producer.pauseProducing()
        # Stream 2 is accepted; every later one is refused with an RST frame.
        for sid in range(2, 2 + 2 * 200, 2):
            session.dataReceived(
                F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, sid, 0)
            )
            if transport.disconnected:
                break
        self.assertTrue(transport.disconnected)
        self.assertLessEqual(len(transport.value()), 1200 + 24)
        session.connectionLost(ConnectionDone())
        self.assertIsInstance(closed[0], ProtocolViolation)


class PausedFinTests(SynchronousTestCase):
    def test_fin_not_delivered_while_paused(self):
        """A FIN arriving while the reader is paused waits for resume."""
        peer = Collector(pause_on_connect=True)
        client, server, pump = connected_sessions(accept_on_server=lambda s: peer)
        stream = client.open_stream(Collector())
        stream.loseWriteConnection()
        pump.flush()
        self.assertFalse(peer.read_closed)
        server.streams[stream.id].resumeProducing()
        self.assertTrue(peer.read_closed)
