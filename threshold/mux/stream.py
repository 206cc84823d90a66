"""One yamux stream, offered to a Twisted protocol as its transport.

A :class:`Stream` is what a protocol sees in ``self.transport``: ``write``,
``loseWriteConnection`` (FIN), ``loseConnection``, ``abortConnection`` (RST),
and a producer for backpressure; it is a push producer itself, so a relay
can register each side as the other's producer. Its life is one
:class:`~threshold.mux.states.StreamState`, moved only through the table in
:mod:`threshold.mux.states`; it knows its session only through the
:class:`~threshold.mux.interfaces.StreamSession` seam.

Flow control: bytes go out only as far as the peer's window allows; the rest
waits in ``_send_buffer`` (a FIN behind it) with the producer paused. Window
is granted back only for bytes handed to the protocol; while it has the
stream paused, bytes (and the peer's FIN) wait in ``_recv_buffer``, which the
peer cannot overfill without breaking the protocol. The window grows for a
reader that keeps up, within the session's budget (:mod:`threshold.mux.budget`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from threshold.logs import observer as log_observer
from threshold.mux.address import StreamAddress
from threshold.mux.budget import ReceiveWindow
from threshold.mux.errors import StreamReset
from threshold.mux.settings import INITIAL_WINDOW
from threshold.mux.states import (
    ENDED,
    OPENING_FLAGS,
    PEER_SENDING,
    WRITABLE,
    StreamEvent,
    StreamState,
    stream_next,
)
from threshold.wire.frames import FLAG_FIN, FLAG_RST

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IProtocol

    from threshold.mux.interfaces import StreamSession

__all__ = ["Stream", "StreamAddress", "StreamReset"]

_S = StreamState
_E = StreamEvent
# Read per frame: an attribute of an Enum class costs about 0.15 µs.
_LINGERING = StreamState.LINGERING
_CLOSING = StreamState.CLOSING


class _EndOfStream:
    """The peer's FIN, waiting in the receive buffer behind earlier bytes."""

    __slots__ = ()


_EOF: Final = _EndOfStream()

#: The reason of every clean stream end: one shared instance, as Twisted's
#: own ``connectionDone``, instead of a new Failure (about 5 µs) per stream.
_STREAM_CLOSED: Final = Failure(ConnectionDone("stream closed"))


@implementer(ITransport, IConsumer, IPushProducer)
class Stream:
    """A yamux stream: transport for one protocol, producer, consumer."""

    log = Logger(observer=log_observer)

    def __init__(self, session: StreamSession, stream_id: int, *, local: bool) -> None:
        self.session = session
        self.id = stream_id
        self.local = local
        self.state = _S.INIT if local else _S.SYN_RECEIVED
        self.protocol: IProtocol | None = None
        # send side: the peer's window for us, 256 KiB until it grants more
        self._send_window = INITIAL_WINDOW
        self._send_buffer: deque[bytes] = deque()
        self._send_buffered = 0
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        # receive side
        self._window = ReceiveWindow(
            session.budget, session.clock, session.config.max_window
        )
        self._recv_buffer: deque[bytes | _EndOfStream] = deque()
        self._recv_buffered = 0
        self._reading_paused = False
        self._linger: IDelayedCall | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<Stream {self.id} of {self.session!r} {self.state.name}>"

    # -- the state ------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the stream has ended (its protocol has been told)."""
        return self.state in ENDED

    @property
    def cut_short(self) -> bool:
        """True when the session ended under this stream before it finished.

        The protocol then gets the session's reason, which may be a clean one
        (a peer process killed, Go Away then close); this tells those that
        relay the stream that its bytes were cut all the same.
        """
        return self.state is _S.LOST

    @property
    def disconnecting(self) -> bool:
        """True once ``loseConnection`` was called or the stream has ended."""
        return self._linger is not None or self.state in ENDED

    def _move(self, event: StreamEvent) -> bool:
        """Apply ``event``; False (nothing changes) if it does not apply."""
        new = stream_next(self.state, event)
        if new is None:
            return False
        self.state = new
        return True

    def take_frame_flags(self) -> int:
        """The flags this stream's next frame must carry: SYN or ACK on the
        first one, nothing after. Whoever sends that frame takes them."""
        flags = OPENING_FLAGS.get(self.state, 0)
        if flags:
            self._move(_E.SENT_OPEN)
        return flags

    # -- attaching a protocol -------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """Make ``protocol`` this stream's protocol and start it."""
        self.protocol = protocol
        protocol.makeConnection(self)
        self._deliver()

    # -- ITransport -----------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes; they wait for window if the peer has none left."""
        state = self.state
        if state not in WRITABLE or not data:
            return
        size = len(data)
        session = self.session
        if (
            not self._send_buffered
            and size <= self._send_window
            and size <= session.config.max_frame_send
            and not session.write_blocked
            and not self._producer_paused
        ):
            # The common case, one frame out at once: what _flush would do,
            # without the buffer round trip (a third of a small write's cost).
            self._send_window -= size
            self.bytes_sent += size
            flags = self.take_frame_flags() if state in OPENING_FLAGS else 0
            session.send_data(self.id, flags, bytes(data))
            return
        self._send_buffer.append(bytes(data))
        self._send_buffered += len(data)
        self._flush()

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        """Send each of ``data`` in order."""
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:  # noqa: N802
        """Half-close: FIN once everything written so far has been sent."""
        if self.state not in WRITABLE:
            return
        self._announce()
        self._move(_E.CLOSE_WRITE)
        if self._send_buffered:
            self._flush()  # the FIN follows the last byte
        else:
            self._send_fin()

    def loseConnection(self) -> None:  # noqa: N802
        """Close gracefully: send what is buffered, FIN, end the protocol.

        Bytes the peer still sends are dropped (their window is granted so
        the peer is never stuck); if its FIN does not come within the
        session's linger time the stream is reset.
        """
        if self.disconnecting:
            return
        self._announce()
        writable = self.state in WRITABLE
        self._move(_E.CLOSE)
        self._drop_received()
        if writable:
            if self._send_buffered:
                self._flush()
            else:
                self._send_fin()
        self._maybe_done()
        if not self.closed and self._linger is None:
            self._linger = self.session.clock.callLater(
                self.session.config.stream_linger, self._linger_expired
            )

    def abortConnection(self) -> None:  # noqa: N802
        """Reset the stream (RST) and end the protocol at once."""
        if self.closed:
            return
        self.session.send_control(self.id, self.take_frame_flags() | FLAG_RST)
        self._finish(_E.RESET, Failure(ConnectionAborted("stream reset locally")))

    def getPeer(self) -> StreamAddress:  # noqa: N802
        """The session's peer address, with this stream's id."""
        return StreamAddress(self.session.peer_address(), self.id)

    def getHost(self) -> StreamAddress:  # noqa: N802
        """The session's local address, with this stream's id."""
        return StreamAddress(self.session.host_address(), self.id)

    # -- IConsumer ------------------------------------------------------

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:  # noqa: N802
        """Register the producer that feeds this stream's writes."""
        if self._producer is not None:
            raise RuntimeError(f"stream {self.id} already has a producer")
        if not streaming:
            raise ValueError("a stream takes only streaming (push) producers")
        self._producer = producer
        self._producer_paused = False
        if self.closed:
            producer.stopProducing()
        elif self._send_buffered:
            self._pause_producer()
        elif self.session.write_blocked:
            self._pause_producer()
            self.session.wait_for_writable(self)

    def unregisterProducer(self) -> None:  # noqa: N802
        """Forget the producer."""
        self._producer = None
        self._producer_paused = False

    # -- IPushProducer: our protocol's reader controls the receive side --

    def pauseProducing(self) -> None:  # noqa: N802
        """Stop delivering received bytes (and stop granting window)."""
        self._reading_paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        """Deliver what waited, and grant window for it."""
        if not self._reading_paused:
            return
        self._reading_paused = False
        self._deliver()

    def stopProducing(self) -> None:  # noqa: N802
        """The consumer is gone: reset the stream."""
        self.abortConnection()

    # -- called by the session -------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Payload for this stream arrived (already checked against window)."""
        size = len(data)
        window = self._window
        window.left -= size
        self.bytes_received += size
        state = self.state
        if state not in PEER_SENDING:
            return  # after the peer's FIN: nothing more is handed on
        lingering = state is _LINGERING
        if not lingering and (
            self._reading_paused or self._recv_buffer or self.protocol is None
        ):
            self._recv_buffer.append(data)
            self._recv_buffered += size
            return
        # Handed on (or, lingering, dropped): its window is granted back.
        window.consumed += size
        if window.consumed * 2 >= window.size:
            self._grant()
        if not lingering:
            self._give(data)

    def ack_received(self) -> None:
        """The peer acknowledged the stream we opened."""
        self._move(_E.ACK_RECEIVED)

    def remote_fin(self) -> None:
        """The peer half-closed its direction."""
        lingering = self.state is _LINGERING
        if not self._move(_E.FIN_RECEIVED):
            return
        if lingering:
            self._maybe_done()  # nothing to hand on: the protocol closed
        else:
            self._recv_buffer.append(_EOF)
            self._deliver()

    def remote_reset(self) -> None:
        """The peer reset the stream."""
        self._finish(_E.RESET, Failure(StreamReset("stream reset by peer")))

    def window_update(self, delta: int) -> None:
        """The peer granted ``delta`` more bytes of send window."""
        self._send_window += delta
        if self._send_buffered:
            self._flush()

    def session_writable(self) -> None:
        """The session's transport has room again."""
        if self._send_buffered:
            self._flush()
        else:
            self._resume_producer()

    def session_lost(self, reason: Failure) -> None:
        """The session ended under this stream, which had not finished."""
        self._finish(_E.SESSION_LOST, reason, notify_session=False)

    def receive_window_left(self) -> int:
        """How many bytes the peer may still send before a Window Update."""
        return self._window.left

    def receive_window(self) -> int:
        """The receive window granted to the peer, 256 KiB or grown."""
        return self._window.size

    def buffered(self) -> tuple[int, int]:
        """Bytes held here: (waiting to be sent, waiting to be read)."""
        return self._send_buffered, self._recv_buffered

    # -- sending ----------------------------------------------------------

    def _announce(self) -> None:
        """Send the opening frame if nothing has carried its SYN or ACK yet."""
        if self.state in OPENING_FLAGS:
            self.session.send_window_update(self.id, self.take_frame_flags(), 0)

    def _flush(self) -> None:
        """Send as much of the buffer as window and session allow.

        Called with bytes buffered; the FIN of a closed direction goes out
        when the last of them does.
        """
        session = self.session
        buf = self._send_buffer
        max_frame = session.config.max_frame_send
        while buf and self._send_window > 0:
            if session.write_blocked:
                session.wait_for_writable(self)
                break
            chunk = buf[0]
            size = min(len(chunk), self._send_window, max_frame)
            if size == len(chunk):
                buf.popleft()
            else:
                buf[0] = chunk[size:]
                chunk = chunk[:size]
            self._send_window -= size
            self._send_buffered -= size
            self.bytes_sent += size
            session.send_data(self.id, self.take_frame_flags(), chunk)
        if self._send_buffered:
            self._pause_producer()
        elif self.state in WRITABLE:
            self._resume_producer()
        else:
            self._send_fin()

    def _send_fin(self) -> None:
        self.session.send_control(self.id, self.take_frame_flags() | FLAG_FIN)
        self._maybe_done()

    def _pause_producer(self) -> None:
        if self._producer is not None and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def _resume_producer(self) -> None:
        if not self._producer_paused:
            return
        if self.session.write_blocked:
            self.session.wait_for_writable(self)
            return
        self._producer_paused = False
        if self._producer is not None:
            self._producer.resumeProducing()

    # -- receiving --------------------------------------------------------

    def _deliver(self) -> None:
        """Hand waiting bytes, then a waiting FIN, to an unpaused protocol."""
        if self.protocol is None:
            return
        buf = self._recv_buffer
        while buf and not self._reading_paused and self.state not in ENDED:
            data = buf.popleft()
            if data is _EOF:
                self._deliver_eof()
                return
            self._recv_buffered -= len(data)
            self._consume(len(data))
            self._give(data)

    def _deliver_eof(self) -> None:
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is None:
            self.loseConnection()
            return
        try:
            half.readConnectionLost()
        except Exception:
            self._protocol_failed("readConnectionLost")
            return
        self._maybe_done()

    def _give(self, data: bytes) -> None:
        """Hand bytes to the protocol; its exception resets this stream only."""
        try:
            self.protocol.dataReceived(data)
        except Exception:
            self._protocol_failed("dataReceived")

    def _protocol_failed(self, what: str) -> None:
        self.log.failure(
            "{name}: stream {stream_id}: {what} raised; resetting the stream",
            name=self.session.name,
            stream_id=self.id,
            what=what,
        )
        self.abortConnection()

    def _consume(self, count: int) -> None:
        """Count bytes handed on; grant window back in batches."""
        if self.state in PEER_SENDING:
            window = self._window
            window.consumed += count
            # Rounded up, so that halving the window never grants below 0.
            if window.consumed * 2 >= window.size:
                self._grant()

    def _grant(self) -> None:
        """Resize the window (within the budget) and grant what was read."""
        delta = self._window.grant(self.session.min_rtt)
        if delta:
            self.session.send_window_update(self.id, self.take_frame_flags(), delta)

    def _drop_received(self) -> None:
        if self._recv_buffered:
            self._consume(self._recv_buffered)
        self._recv_buffer.clear()
        self._recv_buffered = 0

    # -- ending -----------------------------------------------------------

    def _maybe_done(self) -> None:
        """Both directions closed, nothing left to send or hand on: done."""
        if self.state is _CLOSING and not self._send_buffered and not self._recv_buffer:
            self._finish(_E.DRAINED, _STREAM_CLOSED)

    def _linger_expired(self) -> None:
        self._linger = None
        if not self.closed:
            self.log.debug(
                "stream {stream_id}: peer did not close within {linger}s; reset",
                stream_id=self.id,
                linger=self.session.config.stream_linger,
            )
            self.abortConnection()

    def _finish(
        self, event: StreamEvent, reason: Failure, notify_session: bool = True
    ) -> None:
        if not self._move(event):
            return
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        self._send_buffer.clear()
        self._send_buffered = 0
        self._recv_buffer.clear()
        self._recv_buffered = 0
        self._window.release()
        if notify_session:
            self.session.stream_closed(self)
        producer = self._producer
        self._producer = None
        if self.protocol is not None:
            self.protocol.connectionLost(reason)
        if producer is not None:
            # Twisted's rule: a consumer that goes away stops its producer.
            producer.stopProducing()
