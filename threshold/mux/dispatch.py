"""The peer's frames: checked against the protocol, then routed.

:class:`FrameDispatcher` is the :class:`~threshold.wire.frames.FrameHandler`
of a session's decoder. It checks each frame against the rules of yamux
(stream 0 for Ping and Go Away only, the peer's parity for the streams it
opens, no id used twice, no frame for a stream never opened, no Data past
the window) and hands it to its stream, to the keepalive or to the session.
A broken rule raises :class:`~threshold.mux.errors.ProtocolViolation`,
which stops the decoder at that frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from threshold.mux.errors import ProtocolViolation
from threshold.mux.states import ENDED
from threshold.wire.frames import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    TYPE_DATA,
    TYPE_NAMES,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    describe_flags,
)

if TYPE_CHECKING:
    from twisted.logger import Logger

    from threshold.mux.settings import SessionConfig
    from threshold.mux.stream import Stream


def log_frame(
    log: Logger,
    name: str,
    what: str,
    type_: int,
    flags: int,
    stream_id: int,
    length: int,
) -> None:
    """One frame sent or received, at debug level (``debug_frames``)."""
    log.debug(
        "{name}: {what} {type} flags {flags} stream {stream_id} length {length}",
        name=name,
        what=what,
        type=TYPE_NAMES.get(type_, type_),
        flags=describe_flags(flags),
        stream_id=stream_id,
        length=length,
    )


class DispatchTarget(Protocol):
    """What the dispatcher hands frames to: the session."""

    client: bool
    config: SessionConfig
    name: str
    log: Logger
    streams: dict[int, Stream]
    #: The next id we would open (ours below it have been used).
    next_stream_id: int

    def accept_stream(self, stream_id: int) -> Stream | None:
        """The peer opened ``stream_id``: the new stream, or None if refused."""

    def ping_received(self, flags: int, value: int) -> None:
        """A Ping (a question, or the answer to ours)."""

    def go_away_received(self, code: int) -> None:
        """The peer sent Go Away."""


class FrameDispatcher:
    """Checks and routes the frames of one session's peer."""

    def __init__(self, session: DispatchTarget) -> None:
        self._session = session
        self._streams = session.streams
        self._client = session.client
        self._debug = session.config.debug_frames
        #: The highest stream id the peer has opened.
        self.highest_remote = 0
        self._data_stream: Stream | None = None

    # -- FrameHandler -------------------------------------------------------

    def frame_header(self, type_: int, flags: int, stream_id: int, length: int) -> None:
        """Dispatch a frame header."""
        if self._debug:
            session = self._session
            log_frame(
                session.log, session.name, "received", type_, flags, stream_id, length
            )
        if type_ == TYPE_DATA or type_ == TYPE_WINDOW_UPDATE:
            self._stream_frame(type_, flags, stream_id, length)
        elif type_ == TYPE_PING:
            if stream_id != 0:
                raise ProtocolViolation(f"Ping on stream {stream_id} (must be 0)")
            self._session.ping_received(flags, length)
        else:
            if stream_id != 0:
                raise ProtocolViolation(f"Go Away on stream {stream_id} (must be 0)")
            self._session.go_away_received(length)

    def frame_payload(self, stream_id: int, data: bytes) -> None:
        """Pass Data payload to its stream (None: a stream we dropped)."""
        stream = self._data_stream
        if stream is not None and stream.state not in ENDED:
            stream.data_received(data)

    def frame_end(self, stream_id: int, flags: int) -> None:
        """Apply FIN / RST after a Data frame's payload."""
        stream = self._data_stream
        self._data_stream = None
        if stream is not None and stream.state not in ENDED:
            self._end_flags(stream, flags)

    # -- frames for streams ---------------------------------------------------

    def _stream_frame(
        self, type_: int, flags: int, stream_id: int, length: int
    ) -> None:
        if stream_id == 0:
            raise ProtocolViolation(
                f"{TYPE_NAMES[type_]} frame ({describe_flags(flags)}) on stream 0"
            )
        stream = self._streams.get(stream_id)
        if flags & FLAG_SYN:
            stream = self._open_remote(stream_id, stream)
        elif stream is None:
            self._check_known(type_, flags, stream_id)
        elif flags & FLAG_ACK:
            stream.ack_received()
        if type_ == TYPE_DATA:
            if stream is not None and length > stream.receive_window_left():
                raise ProtocolViolation(
                    f"stream {stream_id}: {length} bytes of Data past a window "
                    f"of {stream.receive_window_left()}"
                )
            self._data_stream = stream
            return
        if stream is None or stream.state in ENDED:
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
        if (stream_id % 2 == 1) == self._client:
            raise ProtocolViolation(
                f"peer opened stream {stream_id}, an id of our parity "
                f"({'odd' if self._client else 'even'} ids are ours)"
            )
        if existing is not None or stream_id <= self.highest_remote:
            raise ProtocolViolation(f"peer reused stream id {stream_id}")
        self.highest_remote = stream_id
        return self._session.accept_stream(stream_id)

    def _check_known(self, type_: int, flags: int, stream_id: int) -> None:
        """A frame for a stream we don't hold: closed (ignore) or never opened."""
        ours = (stream_id % 2 == 1) == self._client
        if ours:
            opened = stream_id < self._session.next_stream_id
        else:
            opened = stream_id <= self.highest_remote
        if not opened:
            raise ProtocolViolation(
                f"{TYPE_NAMES[type_]} frame ({describe_flags(flags)}) for stream "
                f"{stream_id}, which was never opened"
            )
