"""Splicing two connections together: bytes, backpressure, half-close.

The idiom of ``twisted.protocols.portforward``, with half-close and resets
carried across: each side of a relay is a :class:`RelayEnd` whose
``dataReceived`` writes to the other side's transport, and each transport
is registered as the producer of the other, so a slow reader on one side
pauses reading on the other side and nothing buffers without bound.

Used for the server's public connections (TCP) with their tunnel streams,
and for the client's streams with their local service connections (TCP).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class RelayEnd(Protocol):
    """One side of a relay; ``peer`` is the other side once joined.

    ``on_close(reason)`` is called once, when this side's connection ends.
    """

    peer: RelayEnd | None = None
    _read_closed = False
    _write_closed = False
    _lost = False
    bytes_in = 0

    def __init__(self, on_close: Callable[[Failure], None] | None = None) -> None:
        self.on_close = on_close

    def join(self, other: RelayEnd) -> None:
        """Join two connected ends: forward both ways, couple backpressure."""
        self.peer = other
        other.peer = self
        # Each transport is the producer of the other: when one side's write
        # buffer fills, reading stops on the other side (and for a stream,
        # so does granting window to the far end).
        self.transport.registerProducer(other.transport, True)
        other.transport.registerProducer(self.transport, True)
        if other._lost:
            self._peer_lost(other._lost_reason)
        elif other._read_closed:
            self._close_write()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Forward to the other side."""
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None and not peer._lost:
            peer.transport.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        """Our side sent EOF: half-close the other side's write direction."""
        self._read_closed = True
        if self.peer is not None:
            self.peer._close_write()
        self._maybe_finish()

    def writeConnectionLost(self) -> None:  # noqa: N802
        """Our write direction is shut."""
        self._write_closed = True
        self._maybe_finish()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # noqa: N802
        """Our side is gone: close the other side the same way."""
        if self._lost:
            return
        self._lost = True
        if reason.check(ConnectionDone) and getattr(self.transport, "cut_short", False):
            # A stream whose session ended before the stream did (a killed
            # peer, a close after the shutdown grace) ends "cleanly" with the
            # session, but its bytes were cut short: reset the other side.
            reason = Failure(
                ConnectionLost(f"session ended under the stream: {reason.value}")
            )
        self._lost_reason = reason
        peer = self.peer
        if peer is not None:
            peer._peer_lost(reason)
        if self.on_close is not None:
            self.on_close(reason)

    def _close_write(self) -> None:
        if self._write_closed or self._lost:
            return
        self._write_closed = True
        # The other side sends nothing more, so it no longer produces for
        # us; and a transport that still has a paused producer registered
        # never gets round to shutting down its write side.
        self.transport.unregisterProducer()
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            self.transport.loseConnection()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._read_closed and self._write_closed and not self._lost:
            self.transport.loseConnection()

    def _peer_lost(self, reason: Failure) -> None:
        if self._lost:
            return
        # As above: a registered (maybe paused) producer would hold the
        # close back forever.
        self.transport.unregisterProducer()
        if reason.check(ConnectionDone):
            # Clean end on the other side: deliver what is buffered, then FIN.
            self.transport.loseConnection()
        else:
            # A reset or a lost connection: pass the abort on, so the far
            # end learns the transfer was cut short rather than complete.
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                self.transport.loseConnection()


def tune_transport(transport: object) -> None:
    """Set TCP_NODELAY on a TCP transport, or on the TCP under a TLS one.

    No Nagle delay: a relay forwards what it has at once, and small
    request/response exchanges must not wait for an ACK.
    """
    for t in (transport, getattr(transport, "transport", None)):
        set_nodelay = getattr(t, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
