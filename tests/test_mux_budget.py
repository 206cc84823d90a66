"""Receive windows bounded by a shared budget (readers that stop, lying RTTs).

The peer is played by the test with raw frames over a StringTransport, so
it can answer Pings as late as it likes and send exactly the window it was
granted; the readers are :class:`Collector` protocols paused at will.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.budget import WindowBudget, next_window
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import INITIAL_WINDOW, MuxSession, SessionConfig
from threshold.testing import Collector, FrameReader
from threshold.wire import frames as F

MIB = 1024 * 1024
CHUNK = 64 * 1024


class RawPeer:
    """The far end of one session: answers its Pings after ``rtt`` seconds,
    opens streams and sends Data up to the window each was granted."""

    def __init__(
        self,
        config: SessionConfig,
        budget: WindowBudget | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.readers: dict[int, Collector] = {}
        self.session = MuxSession(
            client=False,
            clock=self.clock,
            handler=StreamAcceptor(self._accept),
            config=config,
            budget=budget,
        )
        self.transport = StringTransport()
        self.session.makeConnection(self.transport)
        self.credit: dict[int, int] = {}
        self._reader = FrameReader()
        self._next_id = 1

    def _accept(self, stream):
        self.readers[stream.id] = Collector()
        return self.readers[stream.id]

    def _read(self) -> list:
        frames = self._reader.feed(self.transport.value())
        self.transport.clear()
        for f in frames:
            if f.type == F.TYPE_WINDOW_UPDATE and f.stream_id in self.credit:
                self.credit[f.stream_id] += f.length
        return frames

    def answer_ping(self, rtt: float) -> None:
        """Answer the session's outstanding Ping ``rtt`` seconds after it."""
        [ping] = [
            f for f in self._read() if f.type == F.TYPE_PING and f.flags & F.FLAG_SYN
        ]
        self.clock.advance(rtt)
        self.session.dataReceived(
            F.encode_header(F.TYPE_PING, F.FLAG_ACK, 0, ping.length)
        )

    def open(self) -> int:
        sid = self._next_id
        self._next_id += 2
        self.credit[sid] = INITIAL_WINDOW
        self.session.dataReceived(
            F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, sid, 0)
        )
        self._read()
        return sid

    def send(self, sid: int, size: int) -> int:
        """Send up to ``size`` bytes, never past the window; return how many."""
        sent = 0
        while sent < size:
            self._read()
            n = min(CHUNK, size - sent, self.credit[sid])
            if n <= 0:
                break
            self.credit[sid] -= n
            self.session.dataReceived(
                F.encode_header(F.TYPE_DATA, 0, sid, n) + bytes(n)
            )
            sent += n
        self._read()
        return sent

    def fill(self, sid: int) -> int:
        """Send all the window there is."""
        return self.send(sid, 1 << 40)

    def window(self, sid: int) -> int:
        return self.session.streams[sid].receive_window()

    def held(self) -> int:
        """Bytes received and held for readers that do not read."""
        return sum(s.buffered()[1] for s in self.session.streams.values())


def config(**overrides) -> SessionConfig:
    overrides.setdefault("keepalive_interval", 30)
    return SessionConfig(**overrides)


class PausedReadersTests(SynchronousTestCase):
    def test_32_paused_readers_hold_at_most_the_budget(self):
        """32 users download fast over a peer claiming a 5 s RTT, then stop
        reading; the peer fills every window. What the session holds is the
        32 initial windows plus the budget, not 32 grown windows (before the
        budget: up to 16 MiB each, 512 MiB)."""
        peer = RawPeer(config(window_budget=4 * MIB))
        peer.answer_ping(5.0)
        sids = [peer.open() for _ in range(32)]
        for _ in range(4):
            for sid in sids:
                peer.send(sid, 512 * 1024)  # read at once by its Collector
        for sid in sids:
            peer.session.streams[sid].pauseProducing()
        for sid in sids:
            peer.fill(sid)
        budget = peer.session.budget
        self.assertLessEqual(budget.used, 4 * MIB)
        self.assertGreater(budget.used, 2 * MIB)  # the windows did grow
        self.assertLessEqual(peer.held(), 32 * INITIAL_WINDOW + 4 * MIB)
        self.assertGreater(peer.held(), 32 * INITIAL_WINDOW + 2 * MIB)
        # More fills change nothing: no grant while nothing is read.
        self.assertEqual(sum(peer.fill(sid) for sid in sids), 0)

    def test_released_when_streams_end(self):
        """A stream's extra window returns to the budget when it ends."""
        peer = RawPeer(config(window_budget=4 * MIB))
        peer.answer_ping(5.0)
        sid = peer.open()
        peer.send(sid, 6 * MIB)
        self.assertGreater(peer.session.budget.used, 0)
        peer.session.streams[sid].abortConnection()
        self.assertEqual(peer.session.budget.used, 0)
        self.assertEqual(peer.session.budget.claimants, 0)

    def test_released_when_session_ends(self):
        """The session's end gives everything back to a gateway budget."""
        gateway = WindowBudget(8 * MIB)
        peer = RawPeer(config(window_budget=4 * MIB), budget=gateway)
        peer.answer_ping(5.0)
        peer.send(peer.open(), 6 * MIB)
        self.assertGreater(gateway.used, 0)
        peer.session.connectionLost()
        self.assertEqual((gateway.used, gateway.claimants), (0, 0))


class GatewayBudgetTests(SynchronousTestCase):
    def test_shared_by_two_sessions(self):
        """Two sessions under one gateway budget of 6 MiB, each with its own
        4 MiB: the first takes its 4, the second gets only the 2 left; once
        the first's streams end, the second grows into what they freed."""
        clock = Clock()
        gateway = WindowBudget(6 * MIB)
        a = RawPeer(config(window_budget=4 * MIB), budget=gateway, clock=clock)
        b = RawPeer(config(window_budget=4 * MIB), budget=gateway, clock=clock)
        a.answer_ping(5.0)
        b.answer_ping(5.0)
        a_sids = [a.open() for _ in range(2)]
        for sid in a_sids:
            a.send(sid, 16 * MIB)
        self.assertLessEqual(a.session.budget.used, 4 * MIB)
        self.assertGreater(a.session.budget.used, 3 * MIB)
        b_sid = b.open()
        b.send(b_sid, 16 * MIB)
        self.assertLessEqual(gateway.used, 6 * MIB)
        self.assertLessEqual(b.session.budget.used, 6 * MIB - a.session.budget.used)
        before = b.window(b_sid)
        for sid in a_sids:
            a.session.streams[sid].abortConnection()
        b.send(b_sid, 16 * MIB)
        self.assertGreater(b.window(b_sid), before)
        self.assertLessEqual(b.session.budget.used, 4 * MIB)
        self.assertEqual(gateway.used, b.session.budget.used)


class ShrinkTests(SynchronousTestCase):
    def test_window_shrinks_back_under_pressure(self):
        """A stream that took the whole budget gives half back at its next
        grant once another stream's reader keeps up too (it grants less than
        its reader read); then both settle at their fair share, the budget
        full and never over."""
        peer = RawPeer(config(window_budget=4 * MIB, max_window=16 * MIB))
        peer.answer_ping(5.0)
        big = peer.open()
        peer.send(big, 8 * MIB)
        grown = peer.window(big)
        self.assertEqual(grown - INITIAL_WINDOW, 4 * MIB)  # all of the budget
        other = peer.open()
        peer.send(other, INITIAL_WINDOW // 2)  # its reader keeps up: a claimant
        self.assertEqual(peer.window(other), INITIAL_WINDOW)  # no room yet
        credit = peer.credit[big]
        read = grown - credit + INITIAL_WINDOW  # read since its last grant
        peer.send(big, INITIAL_WINDOW)  # a grant falls due
        self.assertEqual(peer.window(big), grown // 2)
        granted = peer.credit[big] - (credit - INITIAL_WINDOW)
        self.assertLess(granted, read)
        budget = peer.session.budget
        for _ in range(8):
            peer.send(other, 1 * MIB)
            peer.send(big, 1 * MIB)
            self.assertLessEqual(budget.used, budget.limit)
        share = 2 * MIB + INITIAL_WINDOW
        self.assertEqual([peer.window(big), peer.window(other)], [share, share])

    def test_many_streams_shrink_to_the_initial_window(self):
        """With more holders than the budget has room for, a grown window
        halves down to, and not past, 256 KiB."""
        budget = WindowBudget(1 * MIB)
        window = 1 * MIB + INITIAL_WINDOW
        budget.change(0, window - INITIAL_WINDOW)
        budget.claim(64)  # fair share: 16 KiB each
        sizes = []
        for _ in range(4):
            new = next_window(budget, window, 16 * MIB, drained_fast=True)
            budget.change(window - INITIAL_WINDOW, new - INITIAL_WINDOW)
            window = new
            sizes.append(window)
            budget.used += 1 * MIB - budget.used  # the others keep it full
        self.assertEqual(sizes[0], (1 * MIB + INITIAL_WINDOW) // 2)
        self.assertEqual(sizes[-1], INITIAL_WINDOW)
        self.assertEqual(min(sizes), INITIAL_WINDOW)


class RttTests(SynchronousTestCase):
    def test_long_path_still_reaches_megabytes(self):
        """One stream on a 100 ms path, budget free: the window grows to
        several MiB (the default settings), as long-distance throughput
        needs."""
        peer = RawPeer(config())
        peer.answer_ping(0.1)
        sid = peer.open()
        peer.send(sid, 24 * MIB)
        self.assertGreaterEqual(peer.window(sid), 8 * MIB)

    def test_tuning_uses_the_smallest_recent_rtt(self):
        """A peer that answers one Ping late does not inflate the RTT that
        auto-tuning uses: a reader draining a half window per 100 ms keeps
        256 KiB on a 10 ms path, even after a 5 s answer."""
        peer = RawPeer(config(keepalive_interval=1))
        peer.answer_ping(0.01)
        peer.clock.advance(1)
        peer.answer_ping(5.0)
        self.assertEqual(peer.session.rtt, 5.0)
        self.assertEqual(peer.session.min_rtt, 0.01)
        sid = peer.open()
        for _ in range(8):
            peer.clock.advance(0.1)
            peer.send(sid, INITIAL_WINDOW // 2)
        self.assertEqual(peer.window(sid), INITIAL_WINDOW)

    def test_lying_peer_gets_no_more_than_the_budget(self):
        """A peer that always answers 5 s late makes every reader look fast;
        each stream is still held to the per-stream maximum and all of them
        together to the session's budget."""
        peer = RawPeer(config(window_budget=6 * MIB, max_window=4 * MIB))
        peer.answer_ping(5.0)
        sids = [peer.open() for _ in range(4)]
        for _ in range(6):
            for sid in sids:
                peer.send(sid, 2 * MIB)
        windows = [peer.window(sid) for sid in sids]
        self.assertLessEqual(max(windows), 4 * MIB)
        self.assertLessEqual(sum(windows) - 4 * INITIAL_WINDOW, 6 * MIB)
        self.assertGreater(sum(windows) - 4 * INITIAL_WINDOW, 4 * MIB)


class BudgetUnitTests(SynchronousTestCase):
    def test_available_is_the_tightest_level(self):
        """What may be taken is the least any level has free."""
        gateway = WindowBudget(10)
        session = WindowBudget(8, parent=gateway)
        other = WindowBudget(8, parent=gateway)
        other.change(0, 5)
        self.assertEqual(session.available(), 5)
        session.change(0, 5)
        self.assertEqual((session.available(), gateway.used), (0, 10))
        self.assertTrue(session.under_pressure())

    def test_negative_budget_refused(self):
        """A budget cannot be negative."""
        self.assertRaises(ValueError, WindowBudget, -1)

    def test_zero_budget_means_no_growth(self):
        """With a zero budget every window stays at 256 KiB."""
        self.assertEqual(
            next_window(WindowBudget(0), INITIAL_WINDOW, 16 * MIB, drained_fast=True),
            INITIAL_WINDOW,
        )

    def test_growth_takes_what_is_left(self):
        """Doubling is cut to what the budget still has."""
        budget = WindowBudget(100 * 1024)
        self.assertEqual(
            next_window(budget, INITIAL_WINDOW, 16 * MIB, drained_fast=True),
            INITIAL_WINDOW + 100 * 1024,
        )
