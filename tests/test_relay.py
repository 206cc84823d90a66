"""Splicing two transports: bytes, backpressure, half-close, resets."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from threshold.relay import PrefixRelay, RelayEnd, RelayState


class HalfCloseTransport(StringTransport):
    """StringTransport that records half-close and abort."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self):  # noqa: N802
        self.write_closed = True

    def abortConnection(self):  # noqa: N802
        self.aborted = True
        self.loseConnection()

    def unregisterProducer(self):  # noqa: N802
        # As TCP and stream transports: unregistering twice is harmless.
        self.producer = None


def joined():
    a, b = RelayEnd(), RelayEnd()
    a.makeConnection(HalfCloseTransport())
    b.makeConnection(HalfCloseTransport())
    a.join(b)
    return a, b


class RelayTests(SynchronousTestCase):
    def test_bytes_cross(self):
        """What one side receives is written to the other, both ways."""
        a, b = joined()
        a.dataReceived(b"to b")
        b.dataReceived(b"to a")
        self.assertEqual(b.transport.value(), b"to b")
        self.assertEqual(a.transport.value(), b"to a")

    def test_each_transport_produces_for_the_other(self):
        """Backpressure: each transport is registered on the other, streaming."""
        a, b = joined()
        self.assertIs(a.transport.producer, b.transport)
        self.assertIs(b.transport.producer, a.transport)
        self.assertTrue(a.transport.streaming)

    def test_eof_half_closes_other_side(self):
        """EOF on one side half-closes the other, after unregistering."""
        a, b = joined()
        a.transport.producer.pauseProducing()
        a.readConnectionLost()
        self.assertTrue(b.transport.write_closed)
        # A paused producer left registered would hold the shutdown back.
        self.assertIsNone(b.transport.producer)
        self.assertFalse(b.transport.disconnecting)

    def test_both_directions_closed_closes(self):
        """When both directions are done, the connection is closed."""
        a, b = joined()
        a.readConnectionLost()
        b.readConnectionLost()
        self.assertTrue(a.transport.disconnecting)
        self.assertTrue(b.transport.disconnecting)

    def test_clean_end_closes_other_gracefully(self):
        """A clean end on one side closes the other gracefully."""
        a, b = joined()
        a.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(b.transport.disconnecting)
        self.assertFalse(b.transport.aborted)
        self.assertIsNone(b.transport.producer)

    def test_reset_aborts_other(self):
        """A lost or reset side aborts the other, so the far end knows."""
        a, b = joined()
        a.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(b.transport.aborted)

    def test_join_after_peer_already_ended(self):
        """Joining to an end that already hit EOF half-closes at once."""
        a, b = RelayEnd(), RelayEnd()
        a.makeConnection(HalfCloseTransport())
        b.makeConnection(HalfCloseTransport())
        b.readConnectionLost()
        a.join(b)
        self.assertTrue(a.transport.write_closed)

    def test_connection_lost_without_argument(self):
        """connectionLost() defaults to a clean end (a Failure, not the class)."""
        a, b = joined()
        a.connectionLost()
        self.assertIs(a.state, RelayState.CLOSED)
        self.assertTrue(b.transport.disconnecting)
        self.assertFalse(b.transport.aborted)

    def test_states(self):
        """One state per end: NEW, OPEN, half-closed, CLOSING, CLOSED."""
        a, b = RelayEnd(), RelayEnd()
        a.makeConnection(HalfCloseTransport())
        b.makeConnection(HalfCloseTransport())
        self.assertIs(a.state, RelayState.NEW)
        a.join(b)
        self.assertIs(a.state, RelayState.OPEN)
        a.readConnectionLost()
        self.assertIs(a.state, RelayState.READ_SHUT)
        self.assertIs(b.state, RelayState.WRITE_SHUT)
        b.readConnectionLost()
        self.assertIs(a.state, RelayState.CLOSING)
        self.assertIs(b.state, RelayState.CLOSING)
        a.connectionLost()
        self.assertIs(a.state, RelayState.CLOSED)

    def test_impossible_move_refused(self):
        """A move the transition table does not list is a bug, caught at once."""
        a = RelayEnd()
        a.makeConnection(HalfCloseTransport())
        a.connectionLost()
        with self.assertRaises(AssertionError):
            a._to(RelayState.OPEN)


class HeaderThenRelay(PrefixRelay):
    """A prefix relay reading one line, as the client's service stream does."""

    def __init__(self):
        super().__init__()
        self.buffer = b""
        self.lines = []
        self.closed_with = None

    def connectionMade(self):  # noqa: N802
        self.read_prefix()

    def prefix_received(self, data):
        self.buffer += data
        if b"\n" in self.buffer:
            line, rest = self.buffer.split(b"\n", 1)
            self.lines.append(line)
            self.buffer = b""
            self.hold(rest)

    def relay_closed(self, reason):
        self.closed_with = reason


class PrefixRelayTests(SynchronousTestCase):
    def start(self):
        end = HeaderThenRelay()
        end.makeConnection(HalfCloseTransport())
        return end

    def other(self):
        other = RelayEnd()
        other.makeConnection(HalfCloseTransport())
        return other

    def test_prefix_then_hold_then_splice(self):
        """The prefix goes to the hook; what follows is held, paused, then sent."""
        end = self.start()
        self.assertIs(end.state, RelayState.PREFIX)
        end.dataReceived(b"service: web\nfirst ")
        self.assertEqual(end.lines, [b"service: web"])
        self.assertIs(end.state, RelayState.HOLDING)
        self.assertEqual(end.transport.producerState, "paused")
        end.dataReceived(b"second")
        other = self.other()
        end.splice(other, [b"HEADER|"])
        self.assertEqual(other.transport.value(), b"HEADER|first second")
        self.assertEqual(end.transport.producerState, "producing")
        self.assertIs(end.state, RelayState.OPEN)
        end.dataReceived(b" third")
        self.assertEqual(other.transport.value(), b"HEADER|first second third")

    def test_eof_while_holding_passed_on_at_splice(self):
        """An EOF before the splice is not lost: the other side half-closes."""
        end = self.start()
        end.dataReceived(b"line\nbody")
        end.readConnectionLost()
        self.assertIs(end.state, RelayState.HELD_EOF)
        other = self.other()
        end.splice(other)
        self.assertEqual(other.transport.value(), b"body")
        self.assertTrue(other.transport.write_closed)
        self.assertIs(end.state, RelayState.READ_SHUT)

    def test_eof_during_prefix_closes(self):
        """EOF before the prefix is complete closes the connection (default)."""
        end = self.start()
        end.dataReceived(b"no newline")
        end.readConnectionLost()
        self.assertIs(end.state, RelayState.CLOSING)
        self.assertTrue(end.transport.disconnecting)
        end.connectionLost()
        self.assertIs(end.state, RelayState.CLOSED)
        self.assertTrue(end.closed_with.check(ConnectionDone))

    def test_closed_while_holding(self):
        """A connection lost before the splice calls relay_closed once."""
        end = self.start()
        end.dataReceived(b"line\n")
        end.connectionLost(Failure(ConnectionLost()))
        end.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(end.closed_with.check(ConnectionLost))
        self.assertIs(end.state, RelayState.CLOSED)

    def test_splice_without_prefix(self):
        """A relay may splice at once, reading nothing first."""
        end = HeaderThenRelay()
        end.connectionMade = lambda: None
        end.makeConnection(HalfCloseTransport())
        other = self.other()
        end.splice(other, [b"opening"])
        end.dataReceived(b"bytes")
        self.assertEqual(other.transport.value(), b"openingbytes")
        self.assertEqual(end.lines, [])

    def test_give_up(self):
        """give_up closes (or resets) before relaying."""
        end = self.start()
        end.give_up(abort=True)
        self.assertTrue(end.transport.aborted)
        self.assertIs(end.state, RelayState.CLOSING)
        end.dataReceived(b"late")
        self.assertEqual(end.lines, [])
