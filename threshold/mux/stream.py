"""One yamux stream, offered to a Twisted protocol as its transport.

A :class:`Stream` is what a protocol sees in ``self.transport``: it can
``write``, half-close with ``loseWriteConnection`` (FIN), close with
``loseConnection``, reset with ``abortConnection`` (RST), and register a
producer for backpressure. It is also a push producer itself, so a relay
can ``stream.registerProducer(other_transport, True)`` and
``other_transport.registerProducer(stream, True)``.

Flow control, per direction:

- sending: bytes go out only as far as the peer's window allows; the rest
  waits in ``_send_buffer`` and the registered producer is paused until a
  Window Update makes room, so the buffer holds at most what the producer
  wrote before it was paused;
- receiving: window is granted back only for bytes the protocol has been
  given. While the protocol has the stream paused, arriving bytes wait in
  ``_recv_buffer``, which the peer cannot overfill without breaking the
  protocol (it may send no more than the window).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from threshold.wire.frames import FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocol

    from threshold.mux.session import MuxSession


class StreamReset(ConnectionLost):
    """The peer reset the stream (RST)."""


@implementer(IAddress)
class StreamAddress:
    """The address of a stream: the session's peer and the stream id."""

    def __init__(self, session_address: IAddress | None, stream_id: int) -> None:
        self.session_address = session_address
        self.stream_id = stream_id

    def __repr__(self) -> str:
        return f"StreamAddress({self.session_address!r}, {self.stream_id})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StreamAddress)
            and other.session_address == self.session_address
            and other.stream_id == self.stream_id
        )

    def __hash__(self) -> int:
        return hash((self.stream_id, repr(self.session_address)))


@implementer(ITransport, IConsumer, IPushProducer)
class Stream:
    """A yamux stream: transport for one protocol, producer, consumer."""

    disconnecting = False

    def __init__(
        self, session: MuxSession, stream_id: int, window: int, *, local: bool
    ) -> None:
        self.session = session
        self.id = stream_id
        self.local = local
        self.protocol: IProtocol | None = None
        # send side
        self._send_window = window
        self._send_buffer: deque[bytes] = deque()
        self._send_buffered = 0
        self._pending_flags = FLAG_SYN if local else FLAG_ACK
        self._write_closing = False
        self._fin_sent = False
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        # receive side
        self._recv_window = window
        self._window_target = window
        self._consumed = 0
        self._epoch_start = session.clock.seconds()
        self._recv_buffer: deque[bytes] = deque()
        self._recv_buffered = 0
        self._reading_paused = False
        self._remote_fin = False
        self._remote_fin_delivered = False
        self._lost_called = False
        self._closing = False
        self._linger = None
        self.closed = False
        #: True when the session ended under this stream before it finished.
        self.cut_short = False
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<Stream {self.id} of {self.session!r}>"

    # -- attaching a protocol -------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """Make ``protocol`` this stream's protocol and start it."""
        self.protocol = protocol
        protocol.makeConnection(self)
        self._deliver()

    # -- ITransport -----------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes; they wait for window if the peer has none left."""
        if self._write_closing or self.closed or not data:
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
            session.send_data(self.id, self._take_flags(), bytes(data))
            return
        self._send_buffer.append(bytes(data))
        self._send_buffered += len(data)
        self._flush()

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        """Send each of ``data`` in order."""
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:  # noqa: N802
        """Half-close: FIN once everything written so far has been sent."""
        if self._write_closing or self.closed:
            return
        self._write_closing = True
        self._flush()

    def loseConnection(self) -> None:  # noqa: N802
        """Close gracefully: send what is buffered, FIN, end the protocol.

        Bytes the peer still sends are dropped (their window is granted so
        the peer is never stuck); if its FIN does not come within the
        session's linger time the stream is reset.
        """
        if self.closed or self._closing:
            return
        self._closing = True
        self.disconnecting = True
        self._drop_received()
        self.loseWriteConnection()
        self._maybe_done()
        if not self.closed and self._linger is None:
            self._linger = self.session.clock.callLater(
                self.session.config.stream_linger, self._linger_expired
            )

    def abortConnection(self) -> None:  # noqa: N802
        """Reset the stream (RST) and end the protocol at once."""
        if self.closed:
            return
        self.session.send_control(self.id, self._take_flags() | FLAG_RST)
        self._finish(Failure(ConnectionAborted("stream reset locally")))

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
        self._recv_window -= len(data)
        self.bytes_received += len(data)
        if self._closing:
            self._consume(len(data))
            return
        if self._reading_paused or self._recv_buffer or self.protocol is None:
            self._recv_buffer.append(data)
            self._recv_buffered += len(data)
            return
        self._consume(len(data))
        self._give(data)

    def remote_fin(self) -> None:
        """The peer half-closed its direction."""
        if self._remote_fin:
            return
        self._remote_fin = True
        self._deliver()

    def remote_reset(self) -> None:
        """The peer reset the stream."""
        self._finish(Failure(StreamReset("stream reset by peer")))

    def window_update(self, delta: int) -> None:
        """The peer granted ``delta`` more bytes of send window."""
        self._send_window += delta
        if self._send_buffered or self._write_closing:
            self._flush()

    def session_lost(self, reason: Failure) -> None:
        """The session ended under this stream, which had not finished.

        The protocol gets the session's reason, which may be a clean one (a
        peer process killed, Go Away then close); ``cut_short`` tells those
        that relay the stream that its bytes were cut all the same.
        """
        self.cut_short = True
        self._finish(reason, notify_session=False)

    def receive_window_left(self) -> int:
        """How many bytes the peer may still send before a Window Update."""
        return self._recv_window

    def buffered(self) -> tuple[int, int]:
        """Bytes held here: (waiting to be sent, waiting to be read)."""
        return self._send_buffered, self._recv_buffered

    # -- internals --------------------------------------------------------

    def _take_flags(self) -> int:
        flags = self._pending_flags
        self._pending_flags = 0
        return flags

    def _flush(self) -> None:
        """Send as much of the buffer as window and session allow."""
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
            session.send_data(self.id, self._take_flags(), chunk)
        if self._send_buffered:
            self._pause_producer()
            return
        if self._write_closing and not self._fin_sent:
            self._fin_sent = True
            session.send_control(self.id, self._take_flags() | FLAG_FIN)
            self._maybe_done()
            return
        self._resume_producer()

    def session_writable(self) -> None:
        """The session's transport has room again."""
        if self._send_buffered or (self._write_closing and not self._fin_sent):
            self._flush()
        else:
            self._resume_producer()

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

    def _deliver(self) -> None:
        """Hand waiting bytes, then a waiting FIN, to an unpaused protocol."""
        protocol = self.protocol
        if protocol is None or self.closed:
            return
        while self._recv_buffer and not self._reading_paused and not self.closed:
            data = self._recv_buffer.popleft()
            self._recv_buffered -= len(data)
            self._consume(len(data))
            self._give(data)
        if (
            self._remote_fin
            and not self._remote_fin_delivered
            and not self._recv_buffer
            and not self._reading_paused
            and not self.closed
        ):
            self._remote_fin_delivered = True
            half = IHalfCloseableProtocol(protocol, None)
            if half is not None and not self._closing:
                try:
                    half.readConnectionLost()
                except Exception:
                    self._protocol_failed("readConnectionLost")
                    return
                self._maybe_done()
            else:
                self.loseConnection()
                self._maybe_done()

    def _give(self, data: bytes) -> None:
        """Hand bytes to the protocol; its exception resets this stream only."""
        try:
            self.protocol.dataReceived(data)
        except Exception:
            self._protocol_failed("dataReceived")

    def _protocol_failed(self, what: str) -> None:
        self.session.log.failure(
            "{name}: stream {stream_id}: {what} raised; resetting the stream",
            name=self.session.name,
            stream_id=self.id,
            what=what,
        )
        self.abortConnection()

    def _consume(self, count: int) -> None:
        """Count bytes handed on; grant window back in batches."""
        self._consumed += count
        if self._remote_fin or self.closed:
            return
        if self._consumed >= self._window_target // 2:
            self._grant()

    def _grant(self) -> None:
        session = self.session
        now = session.clock.seconds()
        target = self._window_target
        rtt = session.rtt
        if rtt is not None and target < session.config.max_window:
            # Auto-tuning as QUIC stacks do: if the reader drained this
            # share of the window in well under two round trips, the window
            # is what limits throughput, so double it.
            fraction = self._consumed / target
            if now - self._epoch_start < 4 * fraction * rtt:
                target = min(target * 2, session.config.max_window)
        delta = self._consumed + (target - self._window_target)
        self._window_target = target
        self._epoch_start = now
        self._consumed = 0
        self._recv_window += delta
        session.send_window_update(self.id, self._take_flags(), delta)

    def _drop_received(self) -> None:
        if self._recv_buffered:
            self._consume(self._recv_buffered)
        self._recv_buffer.clear()
        self._recv_buffered = 0

    def _maybe_done(self) -> None:
        if self._fin_sent and self._remote_fin and not self.closed:
            if self._remote_fin_delivered or self._closing:
                self._finish(Failure(ConnectionDone("stream closed")))

    def _linger_expired(self) -> None:
        self._linger = None
        if not self.closed:
            self.session.log.debug(
                "stream {stream_id}: peer did not close within {linger}s; reset",
                stream_id=self.id,
                linger=self.session.config.stream_linger,
            )
            self.abortConnection()

    def _finish(self, reason: Failure, notify_session: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self.disconnecting = True
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        self._send_buffer.clear()
        self._send_buffered = 0
        self._recv_buffer.clear()
        self._recv_buffered = 0
        if notify_session:
            self.session.stream_closed(self)
        producer = self._producer
        self._producer = None
        if self.protocol is not None and not self._lost_called:
            self._lost_called = True
            self.protocol.connectionLost(reason)
        if producer is not None:
            # Twisted's rule: a consumer that goes away stops its producer.
            producer.stopProducing()
