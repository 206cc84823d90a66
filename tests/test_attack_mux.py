"""An authenticated peer attacking the session layer (issue 11, items 6 and 9).

- After a protocol violation not one more frame is acted on: nothing that
  follows it reaches a stream, reading stops, one warning line.
- A flood of small frames (Ping, SYN) is decoded a bounded slice per turn
  of the reactor, with the transport's reading paused in between, so other
  connections of the same process are served between slices; every frame is
  still acted on, in order.
"""

from __future__ import annotations

import math

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import (
    FRAMES_PER_SLICE,
    INITIAL_WINDOW,
    MuxSession,
    SessionConfig,
    SessionState,
)
from threshold.testing import Collector, Frame, FrameReader, TurnClock, decode_frames
from threshold.wire import frames as F


def data(sid: int, payload: bytes, flags: int = 0) -> bytes:
    return F.encode_header(F.TYPE_DATA, flags, sid, len(payload)) + payload


def ping(value: int) -> bytes:
    return F.encode_header(F.TYPE_PING, F.FLAG_SYN, 0, value)


def syn(sid: int) -> bytes:
    return F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, sid, 0)


class Harness:
    """A session on a StringTransport and a Clock; the peer's streams are
    served by Collectors (or refused)."""

    def __init__(
        self, test: SynchronousTestCase, accept: bool = True, max_streams: int = 100_000
    ) -> None:
        self.clock = TurnClock()
        self.readers: dict[int, Collector] = {}

        def serve(stream):
            if not accept:
                return None
            self.readers[stream.id] = Collector()
            return self.readers[stream.id]

        self.session = MuxSession(
            client=True,
            clock=self.clock,
            handler=StreamAcceptor(serve),
            config=SessionConfig(keepalive_interval=0, max_streams=max_streams),
        )
        self.transport = StringTransport()
        self.session.makeConnection(self.transport)
        self.warnings: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_level") in (LogLevel.warn, LogLevel.error):
                self.warnings.append(event)

        globalLogPublisher.addObserver(observe)
        test.addCleanup(globalLogPublisher.removeObserver, observe)

    def sent(self) -> list:
        frames = decode_frames(self.transport.value())
        self.transport.clear()
        return frames

    def run_slices(self) -> int:
        """Run the session's pending slices; return how many ran."""
        slices = 0
        while any(c.getTime() <= self.clock.seconds() for c in self.clock.calls):
            self.assertions_between_slices()
            self.clock.turn()
            slices += 1
        return slices

    def assertions_between_slices(self) -> None:
        """Overridden by tests that check the state between slices."""


class ViolationStopsReadingTests(SynchronousTestCase):
    def test_nothing_after_the_violation_reaches_a_stream(self):
        """One chunk: Data for an open stream, then Data past its window,
        then more valid Data; a later chunk: more Data and another violation.
        Only the Data before the violation is delivered, reading is paused,
        Go Away 1 goes out once and one warning line is logged. (Before: the
        later chunk was decoded too, its Data delivered to the user and a
        warning logged for each chunk.)"""
        h = Harness(self)
        h.session.dataReceived(syn(2))
        h.sent()
        reader = h.readers[2]
        chunk = data(2, b"before")
        chunk += F.encode_header(F.TYPE_DATA, 0, 2, INITIAL_WINDOW + 1)
        chunk += b"".join(data(2, b"after") for _ in range(100))
        h.session.dataReceived(chunk)
        h.session.dataReceived(data(2, b"later") + data(4, b"never opened"))
        self.assertEqual(reader.data, b"before")
        self.assertEqual(h.transport.producerState, "paused")
        self.assertIs(h.session.state, SessionState.CLOSING)
        self.assertEqual(
            [f for f in h.sent() if f.type == F.TYPE_GO_AWAY],
            [Frame(F.TYPE_GO_AWAY, 0, 0, F.GO_AWAY_PROTOCOL_ERROR)],
        )
        self.assertEqual(len(h.warnings), 1, h.warnings)
        self.assertIn("past a window", h.warnings[0]["what"])
        # The transport is aborted after close_timeout even though the peer
        # is no longer read (so it cannot complete a TLS close).
        h.clock.advance(h.session.config.close_timeout)
        self.assertTrue(h.transport.disconnected)

    def test_violation_in_a_later_slice(self):
        """A violation behind a flood is found in a later slice: the frames
        after it are not acted on either, and reading stays paused."""
        h = Harness(self)
        h.session.dataReceived(syn(2))
        reader = h.readers[2]
        chunk = b"".join(ping(i) for i in range(FRAMES_PER_SLICE * 2))
        chunk += data(2, b"in order")
        chunk += F.encode_header(F.TYPE_PING, F.FLAG_SYN, 6, 0)  # not stream 0
        chunk += data(2, b"dropped")
        h.session.dataReceived(chunk)
        self.assertEqual(reader.data, b"")
        h.run_slices()
        self.assertEqual(reader.data, b"in order")
        self.assertEqual(h.transport.producerState, "paused")
        self.assertEqual(len(h.warnings), 1)


class FloodTests(SynchronousTestCase):
    def test_ping_flood_in_bounded_slices(self):
        """100,000 Pings in one chunk: at most FRAMES_PER_SLICE frames per
        turn, reading paused between slices and resumed at the end, one
        answer per slice (the latest Ping of it), all in order; a Data frame
        behind the flood and one that arrives meanwhile come after it."""
        h = Harness(self)
        h.session.dataReceived(syn(2))
        h.sent()
        reader = h.readers[2]
        count = 100_000
        h.session.dataReceived(b"".join(ping(i) for i in range(count)) + data(2, b"1"))
        self.assertEqual(h.transport.producerState, "paused")
        [first] = h.sent()
        self.assertEqual(first.length, FRAMES_PER_SLICE - 1)
        # More bytes while paused (a TLS transport delivers a whole read).
        h.session.dataReceived(data(2, b"2"))
        answers = [first.length]

        def between() -> None:
            self.assertEqual(h.transport.producerState, "paused")
            self.assertEqual(reader.data, b"")
            answers.extend(f.length for f in h.sent() if f.type == F.TYPE_PING)

        h.assertions_between_slices = between
        slices = 1 + h.run_slices()
        answers.extend(f.length for f in h.sent() if f.type == F.TYPE_PING)
        self.assertEqual(slices, math.ceil((count + 2) / FRAMES_PER_SLICE))
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(reader.data, b"12")
        self.assertEqual(answers, sorted(answers))
        self.assertEqual(answers[-1], count - 1)
        self.assertEqual(len(answers), math.ceil(count / FRAMES_PER_SLICE))
        self.assertEqual(h.warnings, [])

    def test_syn_flood_in_bounded_slices(self):
        """20,000 SYNs the application refuses: refused a slice at a time,
        each with its RST, in order, with reading paused in between."""
        h = Harness(self, accept=False)
        count = 20_000
        h.session.dataReceived(b"".join(syn(2 * i + 2) for i in range(count)))
        resets = [f.stream_id for f in h.sent()]
        self.assertEqual(len(resets), FRAMES_PER_SLICE)

        def between() -> None:
            self.assertEqual(h.transport.producerState, "paused")
            resets.extend(f.stream_id for f in h.sent())

        h.assertions_between_slices = between
        h.run_slices()
        resets.extend(f.stream_id for f in h.sent())
        self.assertEqual(resets, [2 * i + 2 for i in range(count)])
        self.assertEqual(h.session.streams_refused, count)
        self.assertEqual(h.transport.producerState, "producing")

    def test_syn_flood_past_the_stream_limit_logs_little(self):
        """SYNs past max_streams are each refused, but logged only at the
        1st, 2nd, 4th... refusal (before: one warning line per SYN)."""
        h = Harness(self, max_streams=2)
        count = 10_000
        h.session.dataReceived(b"".join(syn(2 * i + 2) for i in range(count)))
        h.run_slices()
        self.assertEqual(len(h.session.streams), 2)
        self.assertEqual(h.session.streams_refused, count - 2)
        self.assertEqual(len(h.warnings), 14)  # 1, 2, 4 ... 8192
        self.assertEqual(h.warnings[-1]["count"], 8192)

    def test_close_during_a_flood_drops_the_rest(self):
        """Go Away (normal) while slices are pending: the rest is not acted
        on, and reading resumes so that a TLS close can complete."""
        h = Harness(self)
        h.session.dataReceived(b"".join(ping(i) for i in range(3 * FRAMES_PER_SLICE)))
        self.assertEqual(h.transport.producerState, "paused")
        h.session.go_away()
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.clock.getDelayedCalls()[0].getTime(), 5.0)  # the abort
        h.sent()
        h.clock.advance(0)
        self.assertEqual([f for f in h.sent() if f.type == F.TYPE_PING], [])

    def test_connection_lost_during_a_flood(self):
        """The connection ends while slices wait: nothing is left scheduled."""
        h = Harness(self)
        h.session.dataReceived(b"".join(ping(i) for i in range(3 * FRAMES_PER_SLICE)))
        h.session.connectionLost()
        self.assertEqual(h.clock.getDelayedCalls(), [])


class _Flooder(Protocol):
    """Writes the flood as soon as it is connected; collects the answers."""

    def __init__(self, wire: bytes, last: int) -> None:
        self.wire = wire
        self.last = last
        self.reader = FrameReader()
        self.answers: list[int] = []
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.wire)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        for frame in self.reader.feed(data):
            if frame.type == F.TYPE_PING and frame.flags & F.FLAG_ACK:
                self.answers.append(frame.length)
                if frame.length == self.last and not self.done.called:
                    self.done.callback(None)


class RealSocketFloodTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_ping_flood_over_tcp(self):
        """Over real loopback TCP, a 100,000-Ping flood is read in slices
        (the socket's reading paused and resumed) and every slice answered,
        the last answer being the last Ping's value."""
        sessions: list[MuxSession] = []
        pauses = []

        class Counting(MuxSession):
            def connectionMade(self) -> None:  # noqa: N802
                super().connectionMade()
                pause = self.transport.pauseProducing

                def counted() -> None:
                    pauses.append(reactor.seconds())
                    pause()

                self.transport.pauseProducing = counted

        def build() -> MuxSession:
            session = Counting(
                client=False,
                clock=reactor,
                handler=StreamAcceptor(lambda s: None),
                config=SessionConfig(keepalive_interval=0),
            )
            sessions.append(session)
            return session

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build)
        )
        self.addCleanup(port.stopListening)
        count = 100_000
        flooder = _Flooder(b"".join(ping(i) for i in range(count)), count - 1)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield connectProtocol(endpoint, flooder)
        yield flooder.done
        self.assertGreater(len(pauses), 1)
        self.assertEqual(flooder.answers, sorted(flooder.answers))
        # One answer per slice, not one per Ping.
        self.assertLess(len(flooder.answers), count // 10)
        closed = sessions[0].when_closed()
        flooder.transport.loseConnection()
        yield closed
