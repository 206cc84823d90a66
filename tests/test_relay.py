"""Splicing two transports: bytes, backpressure, half-close, resets."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from threshold.relay import RelayEnd


class HalfCloseTransport(StringTransport):
    """StringTransport that records half-close and abort."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self):  # noqa: N802
        self.write_closed = True

    def abortConnection(self):  # noqa: N802
        self.aborted = True
        self.loseConnection()


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
