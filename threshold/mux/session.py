"""The yamux session: many streams over one connection.

:class:`MuxSession` is a Twisted protocol for the one TCP (or TLS)
connection between a tunnel client and the server. It knows nothing of
tunnels, services or HTTP: it opens streams, accepts the peer's streams
through a callback, enforces flow control and limits, keeps the connection
alive with Ping, and ends with Go Away.

Backpressure: the session registers itself as the transport's producer.
When the transport's buffer fills, the session stops sending stream data
(streams keep it, within their windows, and pause their own producers);
control frames still go out. A slow stream never pauses the session: it
just stops granting window to its peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from threshold.logs import observer as log_observer
from threshold.mux.settings import INITIAL_WINDOW, SessionConfig
from threshold.mux.stream import Stream
from threshold.wire.frames import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_INTERNAL_ERROR,
    GO_AWAY_NAMES,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    MAX_UINT32,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_NAMES,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    FrameDecoder,
    FrameError,
    describe_flags,
    encode_header,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IAddress,
        IDelayedCall,
        IProtocol,
        IReactorTime,
    )

    from threshold.mux.interfaces import SessionHandler


class ProtocolViolation(Exception):
    """The peer broke the yamux protocol; the session ends with code 1."""


class StreamLimitReached(Exception):
    """Opening a stream would exceed ``max_streams``."""


class SessionClosed(Exception):
    """The session is ending or gone; no stream can be opened."""


class KeepaliveTimeout(ConnectionLost):
    """The peer did not answer a Ping in time."""


class GoAwayReceived(ConnectionDone):
    """The peer ended the session with Go Away."""

    def __init__(self, code: int) -> None:
        super().__init__(f"peer sent Go Away: {GO_AWAY_NAMES.get(code, code)}")
        self.code = code


@implementer(IPushProducer)
class MuxSession(Protocol):
    """One yamux session over ``self.transport``.

    ``client`` is True on the side that dialed (odd stream ids).
    ``handler`` (a :class:`~threshold.mux.interfaces.SessionHandler`) is
    told when the session starts, serves each stream the peer opens (or
    refuses it: RST), and is told when the session ends.
    ``when_closed()`` also fires with the reason once the session has ended.
    """

    log = Logger(observer=log_observer)

    def __init__(
        self,
        *,
        client: bool,
        clock: IReactorTime,
        handler: SessionHandler,
        config: SessionConfig | None = None,
        name: str = "session",
    ) -> None:
        self.client = client
        self.clock = clock
        self.config = config or SessionConfig()
        self.name = name
        self.handler = handler
        self.streams: dict[int, Stream] = {}
        self._next_id = 1 if client else 2
        self._highest_remote = 0
        self._decoder = FrameDecoder(self, self.config.max_frame_receive)
        self._data_stream: Stream | None = None
        self.write_blocked = False
        self._blocked_control = 0
        self._pong_due: int | None = None
        self._waiting: dict[int, Stream] = {}
        self._going_away = False
        self._remote_go_away = False
        self.closed = False
        self._close_reason: Failure | None = None
        self._closed_waiters: list[Deferred[BaseException]] = []
        self._ping_id = 0
        self._ping_sent_at: float | None = None
        self._ping_call: IDelayedCall | None = None
        self._ping_timeout_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self.rtt: float | None = None
        self.streams_opened = 0
        self.streams_accepted = 0
        self.streams_refused = 0

    def __repr__(self) -> str:
        return f"<MuxSession {self.name}>"

    # -- public API -------------------------------------------------------

    def open_stream(self, protocol: IProtocol) -> Stream:
        """Open a stream to the peer and connect ``protocol`` to it.

        SYN goes out at once and data may follow it without waiting for the
        peer's ACK, so a new stream costs no round trip.
        """
        if self.closed or self._going_away or self._remote_go_away:
            raise SessionClosed(f"{self.name} is closing")
        if len(self.streams) >= self.config.max_streams:
            raise StreamLimitReached(
                f"{self.name}: {len(self.streams)} streams open, the maximum"
            )
        stream_id = self._next_id
        if stream_id > MAX_UINT32:
            raise SessionClosed(f"{self.name}: stream ids exhausted")
        self._next_id += 2
        stream = Stream(self, stream_id, INITIAL_WINDOW, local=True)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        self.send_window_update(stream_id, stream._take_flags(), 0)
        stream.attach(protocol)
        return stream

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Send Go Away and close once the streams are done.

        With a non-zero code the connection closes at once.
        """
        if self.closed:
            return
        if not self._going_away:
            self._going_away = True
            self._write(encode_header(TYPE_GO_AWAY, 0, 0, code))
        if code != GO_AWAY_NORMAL or not self.streams:
            self._close_transport()

    def close(self, code: int = GO_AWAY_NORMAL) -> None:
        """Send Go Away and close now, after what was written is flushed."""
        if self.closed:
            return
        if not self._going_away:
            self._going_away = True
            self._write(encode_header(TYPE_GO_AWAY, 0, 0, code))
        self._close_transport()

    def when_closed(self) -> Deferred[BaseException]:
        """A Deferred that fires with the exception saying why it ended."""
        d: Deferred[BaseException] = Deferred()
        if self.closed:
            assert self._close_reason is not None
            d.callback(self._close_reason.value)
        else:
            self._closed_waiters.append(d)
        return d

    def peer_address(self) -> IAddress | None:
        """The transport's peer address."""
        return self.transport.getPeer() if self.transport is not None else None

    def host_address(self) -> IAddress | None:
        """The transport's local address."""
        return self.transport.getHost() if self.transport is not None else None

    def buffered_bytes(self) -> int:
        """Bytes held by all streams, sending and receiving."""
        return sum(sum(s.buffered()) for s in self.streams.values())

    # -- Protocol ---------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        """Register for backpressure and start keepalive."""
        self.transport.registerProducer(self, True)
        if self.config.keepalive_interval > 0:
            # The first Ping measures the round trip at once, which window
            # auto-tuning needs; later ones keep the session alive.
            self._send_ping()
        self.handler.session_started(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Decode frames; a protocol violation ends the session."""
        if self.closed:
            return
        try:
            self._decoder.feed(data)
        except (FrameError, ProtocolViolation) as e:
            self._violation(str(e))
        except Exception:
            self.log.failure("{name}: internal error handling a frame", name=self.name)
            self.go_away(GO_AWAY_INTERNAL_ERROR)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # noqa: N802
        """End every stream and tell whoever waits."""
        if self.closed:
            return
        self.closed = True
        if self._close_reason is None:
            self._close_reason = reason
        for call in (self._ping_call, self._ping_timeout_call, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        streams = list(self.streams.values())
        self.streams.clear()
        self._waiting.clear()
        for stream in streams:
            stream.session_lost(self._close_reason)
        self.handler.session_ended(self, self._close_reason.value)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(self._close_reason.value)

    # -- IPushProducer: the transport tells us when its buffer is full ----

    def pauseProducing(self) -> None:  # noqa: N802
        """The transport is full: hold stream data."""
        self.write_blocked = True

    def resumeProducing(self) -> None:  # noqa: N802
        """The transport has room: let waiting streams send, in turn."""
        self.write_blocked = False
        self._blocked_control = 0
        if self._pong_due is not None:
            value, self._pong_due = self._pong_due, None
            self._write(encode_header(TYPE_PING, FLAG_ACK, 0, value))
        waiting = self._waiting
        while waiting and not self.write_blocked:
            # Oldest first, so every waiting stream gets its turn.
            stream = waiting.pop(next(iter(waiting)))
            stream.session_writable()

    def stopProducing(self) -> None:  # noqa: N802
        """The transport is going away."""

    # -- called by streams -------------------------------------------------

    def wait_for_writable(self, stream: Stream) -> None:
        """Wake ``stream`` when the transport has room again."""
        self._waiting[stream.id] = stream

    def send_data(self, stream_id: int, flags: int, data: bytes) -> None:
        """Write one Data frame."""
        if self.config.debug_frames:
            self._log_frame("sent", TYPE_DATA, flags, stream_id, len(data))
        self.transport.writeSequence(
            [encode_header(TYPE_DATA, flags, stream_id, len(data)), data]
        )

    def send_window_update(self, stream_id: int, flags: int, delta: int) -> None:
        """Write one Window Update frame."""
        self._write(encode_header(TYPE_WINDOW_UPDATE, flags, stream_id, delta))

    def send_control(self, stream_id: int, flags: int) -> None:
        """Write a flags-only frame (FIN, RST) for a stream."""
        self._write(encode_header(TYPE_WINDOW_UPDATE, flags, stream_id, 0))

    def stream_closed(self, stream: Stream) -> None:
        """Forget a finished stream; finish a pending Go Away."""
        self.streams.pop(stream.id, None)
        self._waiting.pop(stream.id, None)
        if self._going_away and not self.streams:
            self._close_transport()

    # -- FrameHandler -------------------------------------------------------

    def frame_header(self, type_: int, flags: int, stream_id: int, length: int) -> None:
        """Dispatch a frame header."""
        if self.config.debug_frames:
            self._log_frame("received", type_, flags, stream_id, length)
        if type_ == TYPE_DATA or type_ == TYPE_WINDOW_UPDATE:
            self._stream_frame(type_, flags, stream_id, length)
        elif type_ == TYPE_PING:
            self._ping(flags, stream_id, length)
        else:
            self._go_away_received(stream_id, length)

    def frame_payload(self, stream_id: int, data: bytes) -> None:
        """Pass Data payload to its stream (None: a stream we dropped)."""
        stream = self._data_stream
        if stream is not None and not stream.closed:
            stream.data_received(data)

    def frame_end(self, stream_id: int, flags: int) -> None:
        """Apply FIN / RST after a Data frame's payload."""
        stream = self._data_stream
        self._data_stream = None
        if stream is not None and not stream.closed:
            self._end_flags(stream, flags)

    # -- internals --------------------------------------------------------------

    def _stream_frame(
        self, type_: int, flags: int, stream_id: int, length: int
    ) -> None:
        if stream_id == 0:
            raise ProtocolViolation(
                f"{TYPE_NAMES[type_]} frame ({describe_flags(flags)}) on stream 0"
            )
        stream = self.streams.get(stream_id)
        if flags & FLAG_SYN:
            stream = self._open_remote(stream_id, stream)
        elif stream is None:
            self._check_known(type_, flags, stream_id)
        if type_ == TYPE_DATA:
            if stream is not None and length > stream.receive_window_left():
                raise ProtocolViolation(
                    f"stream {stream_id}: {length} bytes of Data past a window "
                    f"of {stream.receive_window_left()}"
                )
            self._data_stream = stream
            return
        if stream is None or stream.closed:
            return
        if length:
            stream.window_update(length)
        self._end_flags(stream, flags)

    def _end_flags(self, stream: Stream, flags: int) -> None:
        if flags & FLAG_RST:
            stream.remote_reset()
        elif flags & FLAG_FIN:
            stream.remote_fin()

    def _open_remote(self, stream_id: int, existing: Stream | None) -> Stream | None:
        if (stream_id % 2 == 1) == self.client:
            raise ProtocolViolation(
                f"peer opened stream {stream_id}, an id of our parity "
                f"({'odd' if self.client else 'even'} ids are ours)"
            )
        if existing is not None or stream_id <= self._highest_remote:
            raise ProtocolViolation(f"peer reused stream id {stream_id}")
        self._highest_remote = stream_id
        stream = Stream(self, stream_id, INITIAL_WINDOW, local=False)
        if self._going_away:
            self._refuse(stream_id, "the session is going away")
            return None
        if len(self.streams) >= self.config.max_streams:
            self.log.warn(
                "{name}: peer exceeded {max} concurrent streams; stream "
                "{stream_id} refused",
                name=self.name,
                max=self.config.max_streams,
                stream_id=stream_id,
            )
            self._refuse(stream_id, "stream limit")
            return None
        self.streams[stream_id] = stream
        try:
            protocol = self.handler.stream_opened(self, stream)
        except Exception:
            self.log.failure(
                "{name}: error accepting stream {stream_id}",
                name=self.name,
                stream_id=stream_id,
            )
            protocol = None
        if protocol is None:
            self.streams.pop(stream_id, None)
            self._refuse(stream_id, "refused by the application")
            return None
        self.streams_accepted += 1
        self.send_window_update(stream_id, stream._take_flags(), 0)
        stream.attach(protocol)
        if stream.closed:
            return None
        return stream

    def _refuse(self, stream_id: int, why: str) -> None:
        self.streams_refused += 1
        self.log.debug(
            "{name}: stream {stream_id} refused: {why}",
            name=self.name,
            stream_id=stream_id,
            why=why,
        )
        self._write(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))

    def _check_known(self, type_: int, flags: int, stream_id: int) -> None:
        """A frame for a stream we don't hold: closed (ignore) or never opened."""
        ours = (stream_id % 2 == 1) == self.client
        opened = (
            stream_id < self._next_id if ours else stream_id <= self._highest_remote
        )
        if not opened:
            raise ProtocolViolation(
                f"{TYPE_NAMES[type_]} frame ({describe_flags(flags)}) for stream "
                f"{stream_id}, which was never opened"
            )

    def _ping(self, flags: int, stream_id: int, value: int) -> None:
        if stream_id != 0:
            raise ProtocolViolation(f"Ping on stream {stream_id} (must be 0)")
        if flags & FLAG_SYN:
            if self.write_blocked:
                # The peer is not reading what we send: answer only its
                # latest Ping, once it reads again, so Pings cannot pile up.
                self._pong_due = value
            else:
                self._write(encode_header(TYPE_PING, FLAG_ACK, 0, value))
        elif flags & FLAG_ACK:
            if self._ping_sent_at is not None and value == self._ping_id:
                self.rtt = self.clock.seconds() - self._ping_sent_at
                self._ping_sent_at = None
                if self._ping_timeout_call is not None:
                    if self._ping_timeout_call.active():
                        self._ping_timeout_call.cancel()
                    self._ping_timeout_call = None
                self._ping_call = self.clock.callLater(
                    self.config.keepalive_interval, self._send_ping
                )

    def _send_ping(self) -> None:
        self._ping_call = None
        if self.closed:
            return
        self._ping_id = (self._ping_id + 1) & MAX_UINT32
        self._ping_sent_at = self.clock.seconds()
        self._write(encode_header(TYPE_PING, FLAG_SYN, 0, self._ping_id))
        self._ping_timeout_call = self.clock.callLater(
            self.config.keepalive_timeout, self._keepalive_expired
        )

    def _keepalive_expired(self) -> None:
        self._ping_timeout_call = None
        if self.closed:
            return
        self.log.warn(
            "{name}: no answer to keepalive Ping within {timeout}s; session dead",
            name=self.name,
            timeout=self.config.keepalive_timeout,
        )
        self._close_reason = Failure(
            KeepaliveTimeout(
                f"no answer to Ping within {self.config.keepalive_timeout}s"
            )
        )
        self.transport.abortConnection()

    def _go_away_received(self, stream_id: int, code: int) -> None:
        if stream_id != 0:
            raise ProtocolViolation(f"Go Away on stream {stream_id} (must be 0)")
        self._remote_go_away = True
        if code == GO_AWAY_NORMAL:
            self.log.info("{name}: peer sent Go Away (normal)", name=self.name)
        else:
            self.log.warn(
                "{name}: peer sent Go Away: {what}",
                name=self.name,
                what=GO_AWAY_NAMES.get(code, f"code {code}"),
            )
        if self._close_reason is None:
            self._close_reason = Failure(GoAwayReceived(code))
        # Optional handler hook: the role learns at once that the peer is
        # leaving, not when its last stream ends.
        notify = getattr(self.handler, "go_away_received", None)
        if notify is not None:
            notify(self, code)
        if not self.streams:
            self._close_transport()

    def _violation(self, what: str) -> None:
        self.log.warn(
            "{name}: protocol error by peer {peer}: {what}; sending Go Away",
            name=self.name,
            peer=self.peer_address(),
            what=what,
        )
        if self._close_reason is None:
            self._close_reason = Failure(ProtocolViolation(what))
        self.go_away(GO_AWAY_PROTOCOL_ERROR)

    def _close_transport(self) -> None:
        if self.closed or self.transport is None or self._abort_call is not None:
            return
        # A TLS transport does not shut down while a producer is registered.
        self.transport.unregisterProducer()
        self.write_blocked = False
        self.transport.loseConnection()
        # A peer that stops reading could hold loseConnection open forever.
        self._abort_call = self.clock.callLater(
            self.config.close_timeout, self._abort_transport
        )

    def _abort_transport(self) -> None:
        self._abort_call = None
        if not self.closed:
            self.transport.abortConnection()

    def _log_frame(
        self, what: str, type_: int, flags: int, stream_id: int, length: int
    ) -> None:
        self.log.debug(
            "{name}: {what} {type} flags {flags} stream {stream_id} length {length}",
            name=self.name,
            what=what,
            type=TYPE_NAMES.get(type_, type_),
            flags=describe_flags(flags),
            stream_id=stream_id,
            length=length,
        )

    def _write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        if self.config.debug_frames:
            self._log_frame(
                "sent",
                data[1],
                (data[2] << 8) | data[3],
                int.from_bytes(data[4:8], "big"),
                int.from_bytes(data[8:12], "big"),
            )
        if self.write_blocked:
            # Control frames are written even while the transport is full
            # (they carry window and resets), but a peer that keeps making
            # us answer without reading would grow our buffer forever.
            self._blocked_control += len(data)
            if self._blocked_control > self.config.max_control_backlog:
                self._blocked_control = 0
                self.log.warn(
                    "{name}: peer {peer} makes us write control frames without "
                    "reading them ({limit} bytes); closing",
                    name=self.name,
                    peer=self.peer_address(),
                    limit=self.config.max_control_backlog,
                )
                if self._close_reason is None:
                    self._close_reason = Failure(
                        ProtocolViolation("peer stopped reading control frames")
                    )
                self.transport.abortConnection()
                return
        self.transport.write(data)
