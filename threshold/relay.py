"""Splicing two connections together: bytes, backpressure, half-close.

The idiom of ``twisted.protocols.portforward``, with half-close and resets
carried across: each side of a relay is a :class:`RelayEnd` whose
``dataReceived`` writes to the other side's transport, and each transport
is registered as the producer of the other, so a slow reader on one side
pauses reading on the other side and nothing buffers without bound.

:class:`PrefixRelay` is the shape both roles need on their accepting side:
read a prefix first (the gateway reads a TLS ClientHello, the client reads
the service header line), decide where the connection goes, then splice.

Each end has one state, :class:`RelayState`, changed only through
:meth:`RelayEnd._to` against the table ``_TRANSITIONS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection as _TcpConnection
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["PrefixRelay", "RelayEnd", "RelayState", "tune_transport", "write_at_once"]


class RelayState(Enum):
    """Where one end of a relay is in its life."""

    #: Connected, not relaying yet: bytes received are held for the peer.
    NEW = "new"
    #: Reading the prefix: bytes go to ``prefix_received``.
    PREFIX = "prefix"
    #: Prefix read, the other end not there yet: reading paused, bytes held.
    HOLDING = "holding"
    #: End of input came before the splice: passed on once spliced.
    HELD_EOF = "held_eof"
    #: Spliced: bytes relayed both ways.
    OPEN = "open"
    #: Our side sent EOF (passed on to the peer); we still write.
    READ_SHUT = "read_shut"
    #: Our write direction is shut (the peer sent EOF); we still read.
    WRITE_SHUT = "write_shut"
    #: Both directions done or the peer is gone: our transport is closing.
    CLOSING = "closing"
    #: connectionLost ran.
    CLOSED = "closed"


_S = RelayState
_BEFORE_SPLICE = frozenset({_S.NEW, _S.PREFIX, _S.HOLDING, _S.HELD_EOF})
_TRANSITIONS: dict[RelayState, frozenset[RelayState]] = {
    _S.NEW: frozenset({_S.PREFIX, _S.HELD_EOF, _S.OPEN, _S.CLOSING, _S.CLOSED}),
    _S.PREFIX: frozenset({_S.HOLDING, _S.OPEN, _S.CLOSING, _S.CLOSED}),
    _S.HOLDING: frozenset({_S.HELD_EOF, _S.OPEN, _S.CLOSING, _S.CLOSED}),
    _S.HELD_EOF: frozenset({_S.READ_SHUT, _S.CLOSING, _S.CLOSED}),
    _S.OPEN: frozenset({_S.READ_SHUT, _S.WRITE_SHUT, _S.CLOSING, _S.CLOSED}),
    _S.READ_SHUT: frozenset({_S.CLOSING, _S.CLOSED}),
    _S.WRITE_SHUT: frozenset({_S.CLOSING, _S.CLOSED}),
    _S.CLOSING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


@implementer(IHalfCloseableProtocol)
class RelayEnd(Protocol):
    """One side of a relay; ``peer`` is the other side once joined.

    Bytes that arrive before :meth:`join` are held and delivered at the
    join, as is an EOF. ``on_close(reason)`` (or an override of
    :meth:`relay_closed`) is called once, when this side's connection ends.
    """

    peer: RelayEnd | None = None
    _lost_reason: Failure | None = None

    def __init__(self, on_close: Callable[[Failure], None] | None = None) -> None:
        self.on_close = on_close
        self.state = RelayState.NEW
        self._held: list[bytes] = []

    def _to(self, state: RelayState) -> None:
        """Move to ``state``; a move the table does not allow is a bug."""
        if state not in _TRANSITIONS[self.state]:
            raise AssertionError(f"relay end: {self.state.name} -> {state.name}")
        self.state = state

    # -- splicing -----------------------------------------------------------

    def join(self, other: RelayEnd, first: Sequence[bytes] = ()) -> None:
        """Join two connected ends: forward both ways, couple backpressure.

        ``first`` goes to the other end before anything this end held.
        """
        self.peer = other
        other.peer = self
        # Each transport is the producer of the other: when one side's write
        # buffer fills, reading stops on the other side (and for a stream,
        # so does granting window to the far end).
        self.transport.registerProducer(other.transport, True)
        other.transport.registerProducer(self.transport, True)
        outgoing = [*first, *self._held]
        incoming = other._held
        self._held = other._held = []
        if outgoing and other.state is not RelayState.CLOSED:
            other.transport.writeSequence(outgoing)
        if incoming and self.state is not RelayState.CLOSED:
            self.transport.writeSequence(incoming)
        # Both ends relay before either passes on an EOF or a loss it held.
        for end in (self, other):
            if end.state in _BEFORE_SPLICE and end.state is not RelayState.HELD_EOF:
                end._to(RelayState.OPEN)
        for end in (self, other):
            end._pass_on_held_end()

    def _pass_on_held_end(self) -> None:
        peer = self.peer
        assert peer is not None
        if self.state is RelayState.CLOSED:
            assert self._lost_reason is not None
            peer._peer_lost(self._lost_reason)
        elif self.state is RelayState.HELD_EOF:
            self._to(RelayState.READ_SHUT)
            peer._close_write()

    # -- IProtocol / IHalfCloseableProtocol ---------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Forward to the other side (hold it before the splice)."""
        state = self.state
        if state is RelayState.OPEN or state is RelayState.WRITE_SHUT:
            peer = self.peer
            if peer is not None and peer.state is not RelayState.CLOSED:
                peer.transport.write(data)
        elif state is RelayState.PREFIX:
            self.prefix_received(data)
        elif state is RelayState.NEW or state is RelayState.HOLDING:
            self._held.append(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        """Our side sent EOF: half-close the other side's write direction."""
        state = self.state
        if state is RelayState.PREFIX:
            self.prefix_ended()
        elif state is RelayState.NEW or state is RelayState.HOLDING:
            self._to(RelayState.HELD_EOF)
        elif state is RelayState.OPEN:
            self._to(RelayState.READ_SHUT)
            assert self.peer is not None
            self.peer._close_write()
        elif state is RelayState.WRITE_SHUT:
            self._to(RelayState.CLOSING)
            assert self.peer is not None
            self.peer._close_write()
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        """Our write direction is shut."""
        if self.state is RelayState.OPEN:
            self._to(RelayState.WRITE_SHUT)
        elif self.state is RelayState.READ_SHUT:
            self._to(RelayState.CLOSING)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        """Our side is gone: close the other side the same way."""
        if self.state is RelayState.CLOSED:
            return
        if reason is None:
            reason = Failure(ConnectionDone())
        if reason.check(ConnectionDone) and getattr(self.transport, "cut_short", False):
            # A stream whose session ended before the stream did (a killed
            # peer, a close after the shutdown grace) ends "cleanly" with the
            # session, but its bytes were cut short: reset the other side.
            reason = Failure(
                ConnectionLost(f"session ended under the stream: {reason.value}")
            )
        self._to(RelayState.CLOSED)
        self._lost_reason = reason
        self._held = []
        peer = self.peer
        if peer is not None:
            peer._peer_lost(reason)
        self.relay_closed(reason)

    def relay_closed(self, reason: Failure) -> None:
        """This side's connection ended (once); calls ``on_close``."""
        if self.on_close is not None:
            self.on_close(reason)

    def give_up(self, abort: bool = False) -> None:
        """Close this end before or instead of relaying (abort: reset it)."""
        if self.state is RelayState.CLOSING or self.state is RelayState.CLOSED:
            return
        self._to(RelayState.CLOSING)
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # -- hooks of the prefix phase (see PrefixRelay) ------------------------

    def prefix_received(self, data: bytes) -> None:
        """Bytes that arrived while reading the prefix."""
        raise NotImplementedError

    def prefix_ended(self) -> None:
        """End of input before the prefix was complete: close by default."""
        self.give_up()

    # -- what the other side asks of us --------------------------------------

    def _close_write(self) -> None:
        state = self.state
        if state is not RelayState.OPEN and state is not RelayState.READ_SHUT:
            return
        # The other side sends nothing more, so it no longer produces for
        # us; and a transport that still has a paused producer registered
        # never gets round to shutting down its write side.
        self.transport.unregisterProducer()
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if state is RelayState.OPEN and lose_write is not None:
            self._to(RelayState.WRITE_SHUT)
            lose_write()
        else:
            self._to(RelayState.CLOSING)
            self.transport.loseConnection()

    def _peer_lost(self, reason: Failure) -> None:
        if self.state is RelayState.CLOSED:
            return
        if self.state is not RelayState.CLOSING:
            self._to(RelayState.CLOSING)
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


class PrefixRelay(RelayEnd):
    """Read a prefix, decide where the connection goes, then splice it.

    The accepting side of both roles: the gateway's public connection reads
    a TLS ClientHello, the client's service stream reads the service
    header line. A subclass:

    - calls :meth:`read_prefix` (typically in ``connectionMade``): from
      then on every chunk goes to :meth:`prefix_received`, which it
      overrides to parse (bounded: it must give up on a prefix too long);
    - when the prefix says where to go and the other end is already
      connected (an opened stream), calls :meth:`splice` with it and the
      bytes to send first (the prefix, or what replaces it);
    - when the other end needs connecting first (a local TCP connection),
      calls :meth:`hold` with the bytes that followed the prefix: reading
      pauses, later bytes and an EOF are held, and :meth:`splice` delivers
      them and resumes reading once the other end is up;
    - may call :meth:`splice` without reading a prefix at all;
    - to give up, calls :meth:`give_up` (``abort=True`` to reset);
    - overrides :meth:`prefix_ended` for an EOF before the prefix is
      complete (the default closes the connection), and
      :meth:`relay_closed` to release what it holds (called exactly once,
      whatever the state when the connection ended).

    ``state`` (a :class:`RelayState`) says where the connection is: NEW,
    PREFIX, HOLDING (HELD_EOF), then OPEN, READ_SHUT, WRITE_SHUT, CLOSING,
    CLOSED.
    """

    def read_prefix(self) -> None:
        """Start reading the prefix: chunks go to :meth:`prefix_received`."""
        self._to(RelayState.PREFIX)

    def hold(self, rest: bytes = b"") -> None:
        """The prefix is read; hold ``rest`` and what follows until spliced."""
        self._to(RelayState.HOLDING)
        if rest:
            self._held.append(rest)
        self.transport.pauseProducing()

    def splice(self, other: RelayEnd, first: Sequence[bytes] = ()) -> None:
        """Relay to ``other`` from now on, sending ``first`` ahead of the rest.

        ``other`` must be connected. Held bytes follow ``first``; a held EOF
        is passed on; reading resumes if :meth:`hold` paused it. Nothing
        happens if this connection has closed meanwhile (``other`` is then
        closed the same way).
        """
        held = self.state is RelayState.HOLDING or self.state is RelayState.HELD_EOF
        self.join(other, first)
        if held and self.state not in (RelayState.CLOSING, RelayState.CLOSED):
            self.transport.resumeProducing()


def tune_transport(transport: object) -> None:
    """Tune a TCP transport, or the TCP under a TLS one, for relaying.

    No Nagle delay: a relay forwards what it has at once, and small
    request/response exchanges must not wait for an ACK. And writes go to
    the socket at once (:func:`write_at_once`).
    """
    for t in (transport, getattr(transport, "transport", None)):
        set_nodelay = getattr(t, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
            if isinstance(t, _TcpConnection):
                write_at_once(t)


#: Writes this size and more take Twisted's buffer (a TLS record's payload
#: is up to 16 KiB, so bulk pieces are well above it).
_AT_ONCE_BELOW = 4 * 1024


def write_at_once(connection: _TcpConnection) -> None:
    """Make ``connection.write`` send to the socket now when nothing waits.

    Twisted's TCP ``write`` only buffers and asks the reactor to watch the
    socket for writing; the bytes go out on the reactor's next turn, and
    watching and unwatching cost a system call each. A relay writes once
    per chunk it reads, so that is a turn and two system calls per chunk
    per hop, in latency and CPU. With nothing buffered (so the order holds)
    and the connection fully open, this sends at once; whatever the socket
    does not take, and every other case, goes through Twisted's ``write``
    as before (which also reports a send error on its next turn).

    Only small writes go at once (requests, answers, frames of a few KiB):
    bulk comes as several TLS records per chunk read, or as a Data frame's
    payload in record-sized pieces, which Twisted's buffer joins into one
    send on its turn (one system call instead of one per piece).
    """
    buffered = connection.write
    sock = connection.socket

    def write(data: bytes) -> None:
        c = connection
        if (
            c.connected
            and not c.disconnecting
            and not c._writeDisconnecting
            and not c._tempDataLen
            and c.offset == len(c.dataBuffer)
            and type(data) is bytes
            and len(data) < _AT_ONCE_BELOW
        ):
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # full (EAGAIN) or failing: Twisted's path decides
            if sent == len(data):
                return
            data = data[sent:]
        buffered(data)

    connection.write = write  # type: ignore[method-assign]
