"""The yamux session: many streams over one connection.

:class:`MuxSession` is a Twisted protocol for the one TCP (or TLS) connection
between a tunnel client and the server. It knows nothing of tunnels, services
or HTTP: it opens streams, serves the peer's through its
:class:`SessionHandler`, enforces flow control and limits, keeps the
connection alive (:mod:`threshold.mux.keepalive`) and ends with Go Away. Its
life is one :class:`~threshold.mux.states.SessionState`.

Backpressure: the session is the transport's producer. When the transport's
buffer fills, stream data waits (streams keep it, within their windows, and
pause their producers); control frames still go out. A slow stream never
pauses the session: it just stops granting window to its peer.

Writes go through a :class:`~threshold.mux.writer.FrameWriter`, corked while
the session acts on a slice of the peer's frames (and by a role around
opening a stream and its first bytes): one TLS record per burst.

Fairness: one session acts on at most
:data:`~threshold.mux.intake.FRAMES_PER_SLICE` frames per turn of the reactor
(:mod:`threshold.mux.intake`), so one peer's flood of small frames cannot
hold up every other connection of the process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from threshold.logs import observer as log_observer
from threshold.mux.budget import WindowBudget
from threshold.mux.dispatch import FrameDispatcher, log_frame
from threshold.mux.errors import (
    GoAwayReceived,
    KeepaliveTimeout,
    ProtocolViolation,
    SessionClosed,
    StreamLimitReached,
)
from threshold.mux.intake import FRAMES_PER_SLICE as FRAMES_PER_SLICE
from threshold.mux.intake import SlicedInput
from threshold.mux.keepalive import Keepalive
from threshold.mux.settings import INITIAL_WINDOW as INITIAL_WINDOW
from threshold.mux.settings import SessionConfig
from threshold.mux.states import (
    ACCEPTING,
    OPENING_ALLOWED,
    READING,
    SessionEvent,
    SessionState,
    session_next,
)
from threshold.mux.stream import Stream
from threshold.mux.writer import FrameWriter, widen_buffer
from threshold.wire.frames import (
    FLAG_RST,
    GO_AWAY_INTERNAL_ERROR,
    GO_AWAY_NAMES,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    MAX_UINT32,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_WINDOW_UPDATE,
    FrameDecoder,
    FrameError,
    decode_header,
    encode_header,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IAddress,
        IDelayedCall,
        IProtocol,
        IReactorTime,
    )


# Read per frame written: an attribute of an Enum class costs about 0.15 µs.
_CLOSED = SessionState.CLOSED


class SessionHandler(TypingProtocol):
    """What a session tells its role: the one way a role plugs in
    (``MuxSession(handler=...)``, never a subclass). Optional too:
    ``go_away_received(session, code)``, as soon as the peer sends Go Away."""

    def session_started(self, session: MuxSession) -> None:
        """The transport is up and the session registered as its producer."""

    def stream_opened(self, session: MuxSession, stream: Stream) -> IProtocol | None:
        """The peer opened ``stream``: the protocol to serve it, or None (RST)."""

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        """The session is over (every stream already ended), with why."""


@implementer(IPushProducer)
class MuxSession(Protocol):
    """One yamux session over ``self.transport``.

    ``client``: the side that dialed (odd stream ids). ``handler``: the role,
    a :class:`SessionHandler`. ``budget``: a
    :class:`~threshold.mux.budget.WindowBudget` shared with other sessions
    (a gateway's), inside which this session's own one
    (``config.window_budget``) is drawn. ``when_closed()`` fires with the
    reason once the session has ended.
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
        budget: WindowBudget | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.config = config or SessionConfig()
        self.name = name
        self.handler = handler
        self.state = SessionState.OPEN
        self.budget = WindowBudget(self.config.window_budget, parent=budget)
        self.streams: dict[int, Stream] = {}
        #: The id of the next stream we open (odd on the dialing side).
        self.next_stream_id = 1 if client else 2
        self._decoder = FrameDecoder(
            FrameDispatcher(self), self.config.max_frame_receive
        )
        self._input = SlicedInput(clock, self._decode_slice)
        self.write_blocked = False
        self._blocked_control = 0
        self._waiting: dict[int, Stream] = {}
        self._out = FrameWriter()
        self._keepalive = Keepalive(
            clock, self.config, self._write, self._keepalive_expired
        )
        self._close_reason: Failure | None = None
        self._closed_waiters: list[Deferred[BaseException]] = []
        self._abort_call: IDelayedCall | None = None
        self.streams_opened = 0
        self.streams_accepted = 0
        self.streams_refused = 0
        self._over_limit = 0  # streams refused for max_streams

    def __repr__(self) -> str:
        return f"<MuxSession {self.name}>"

    @property
    def closed(self) -> bool:
        """True once the connection is gone."""
        return self.state is _CLOSED

    @property
    def rtt(self) -> float | None:
        """The latest round trip measured by Ping (seconds), or None."""
        return self._keepalive.rtt

    @property
    def min_rtt(self) -> float | None:
        """The smallest recent round trip, what window auto-tuning uses."""
        return self._keepalive.min_rtt

    def _move(self, event: SessionEvent) -> bool:
        new = session_next(self.state, event)
        if new is None:
            return False
        self.state = new
        return True

    # -- public API -------------------------------------------------------

    def open_stream(self, protocol: IProtocol) -> Stream:
        """Open a stream to the peer and connect ``protocol`` to it.

        SYN goes out at once and data may follow it without waiting for the
        peer's ACK, so a new stream costs no round trip.
        """
        if self.state not in OPENING_ALLOWED:
            raise SessionClosed(f"{self.name} is closing")
        if len(self.streams) >= self.config.max_streams:
            raise StreamLimitReached(
                f"{self.name}: {len(self.streams)} streams open, the maximum"
            )
        stream_id = self.next_stream_id
        if stream_id > MAX_UINT32:
            raise SessionClosed(f"{self.name}: stream ids exhausted")
        self.next_stream_id += 2
        stream = Stream(self, stream_id, local=True)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        self.send_window_update(stream_id, stream.take_frame_flags(), 0)
        stream.attach(protocol)
        return stream

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Send Go Away and close once the streams are done.

        With a non-zero code the connection closes at once, and nothing more
        the peer sends is read.
        """
        if self._move(SessionEvent.GO_AWAY_SENT):
            self._write(encode_header(TYPE_GO_AWAY, 0, 0, code))
        if code != GO_AWAY_NORMAL:
            self._close_transport(stop_reading=True)
        elif not self.streams:
            self._close_transport()

    def close(self, code: int = GO_AWAY_NORMAL) -> None:
        """Send Go Away and close now, after what was written is flushed."""
        if self._move(SessionEvent.GO_AWAY_SENT):
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

    def cork(self) -> None:
        """Hold frames written until :meth:`uncork` (``try``/``finally``,
        within one reactor callback): they go as one write."""
        self._out.cork()

    def uncork(self) -> None:
        """Write the frames held since the outermost :meth:`cork`."""
        self._out.uncork()

    def buffered_bytes(self) -> int:
        """Bytes held by all streams, sending and receiving."""
        return sum(sum(s.buffered()) for s in self.streams.values())

    # -- Protocol ---------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        """Register for backpressure and start keepalive."""
        self.transport.registerProducer(self, True)
        self._input.transport = self._out.transport = self.transport
        widen_buffer(self.transport)
        # The first Ping measures the round trip at once, which window
        # auto-tuning needs; later ones keep the session alive.
        self._keepalive.start()
        self.handler.session_started(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Decode a slice of frames; what is left waits for the next turn."""
        if self.state in READING:
            self._input.data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """End every stream and tell whoever waits."""
        if not self._move(SessionEvent.CONNECTION_LOST):
            return
        if self._close_reason is None:
            self._close_reason = reason
        self._out.drop()
        self._keepalive.stop()
        self._input.stop()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
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
        self._keepalive.send_answer()
        waiting = self._waiting
        while waiting and not self.write_blocked:
            # Oldest first, so every waiting stream gets its turn.
            stream = waiting.pop(next(iter(waiting)))
            stream.session_writable()

    def stopProducing(self) -> None:  # noqa: N802
        """The transport is going away."""

    # -- called by streams (the StreamSession seam) ------------------------

    def wait_for_writable(self, stream: Stream) -> None:
        """Wake ``stream`` when the transport has room again."""
        self._waiting[stream.id] = stream

    def send_data(self, stream_id: int, flags: int, data: bytes) -> None:
        """Write one Data frame."""
        if self.config.debug_frames:
            log_frame(
                self.log, self.name, "sent", TYPE_DATA, flags, stream_id, len(data)
            )
        self._out.write_data(
            encode_header(TYPE_DATA, flags, stream_id, len(data)), data
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
        if self.state is SessionState.GOING_AWAY and not self.streams:
            self._close_transport()

    # -- reading, a slice at a time ----------------------------------------

    def _decode_slice(self, data: bytes) -> bytes:
        """Act on up to FRAMES_PER_SLICE frames; return the bytes left over.

        Nothing is left over once reading has stopped: after a protocol
        violation not one more frame is acted on, not even from this chunk.
        """
        # What acting on the slice writes (window updates, ACKs, FINs, the
        # Ping answer) goes out together at the end.
        self.cork()
        try:
            try:
                used = self._decoder.feed(data, FRAMES_PER_SLICE)
            except (FrameError, ProtocolViolation) as e:
                self._violation(str(e))
                return b""
            except Exception:
                self.log.failure(
                    "{name}: internal error handling a frame", name=self.name
                )
                self.go_away(GO_AWAY_INTERNAL_ERROR)
                return b""
            if self._keepalive.answer_due is not None and not self.write_blocked:
                self._keepalive.send_answer()
        finally:
            self.uncork()
        if used == len(data) or self.state not in READING:
            return b""
        return data[used:]

    # -- called by the dispatcher (the peer's frames) -----------------------

    def accept_stream(self, stream_id: int) -> Stream | None:
        """The peer opened ``stream_id``: serve it, or refuse it (RST)."""
        if self.state not in ACCEPTING:
            self._refuse(stream_id, "the session is going away")
            return None
        if len(self.streams) >= self.config.max_streams:
            self._over_limit += 1
            if self._over_limit & (self._over_limit - 1) == 0:
                # The 1st, 2nd, 4th, 8th...: a SYN flood past the limit
                # costs a few log lines, not one per SYN.
                self.log.warn(
                    "{name}: peer exceeded {max} concurrent streams; stream "
                    "{stream_id} refused ({count} so far)",
                    name=self.name,
                    max=self.config.max_streams,
                    stream_id=stream_id,
                    count=self._over_limit,
                )
            self._refuse(stream_id, "stream limit")
            return None
        stream = Stream(self, stream_id, local=False)
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
        self.send_window_update(stream_id, stream.take_frame_flags(), 0)
        stream.attach(protocol)
        if stream.closed:
            return None
        return stream

    def ping_received(self, flags: int, value: int) -> None:
        """A Ping: answered at the end of the slice (the latest only)."""
        self._keepalive.ping_received(flags, value)

    def _refuse(self, stream_id: int, why: str) -> None:
        self.streams_refused += 1
        self.log.debug(
            "{name}: stream {stream_id} refused: {why}",
            name=self.name,
            stream_id=stream_id,
            why=why,
        )
        self._write(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))

    # -- the session's end ----------------------------------------------------

    def _keepalive_expired(self) -> None:
        if self.closed:
            return
        self.log.warn(
            "{name}: no answer to keepalive Ping within {timeout}s; session dead",
            name=self.name,
            timeout=self.config.keepalive_timeout,
        )
        why = f"no answer to Ping within {self.config.keepalive_timeout}s"
        self._close_reason = Failure(KeepaliveTimeout(why))
        self.transport.abortConnection()

    def go_away_received(self, code: int) -> None:
        """The peer sent Go Away: open nothing more; close when no stream is left."""
        self._move(SessionEvent.GO_AWAY_RECEIVED)
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

    def _close_transport(self, stop_reading: bool = False) -> None:
        if self.transport is None or not self._move(SessionEvent.CLOSE):
            return
        self._out.flush()  # a Go Away held by a cork goes out first
        self._input.stop()  # nothing more is acted on
        if stop_reading:
            # After an error the peer is not even read (the kernel's buffer
            # fills, then its window closes); the abort below ends it.
            self._input.pause_reading()
        else:
            self._input.resume_reading()  # a TLS close reads close_notify
        # A TLS transport does not shut down while a producer is registered.
        self.transport.unregisterProducer()
        self.write_blocked = False
        self.transport.loseConnection()
        # A peer that stops reading could hold loseConnection open forever
        # (and a TLS close waits for the peer's close_notify, unread when
        # reading is stopped).
        self._abort_call = self.clock.callLater(
            self.config.close_timeout, self._abort_transport
        )

    def _abort_transport(self) -> None:
        self._abort_call = None
        if not self.closed:
            self.transport.abortConnection()

    # -- writing --------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.state is _CLOSED or self.transport is None:
            return
        if self.config.debug_frames:
            log_frame(self.log, self.name, "sent", *decode_header(data))
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
        self._out.write(data)
