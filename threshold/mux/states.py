"""The life of a stream and of a session: one state each, and its transitions.

A stream's state follows hashicorp/yamux's (init, SYN sent, SYN received,
established, local close, remote close, closed, reset), with three more a
non-blocking stream needs: ``LINGERING`` (the protocol closed the stream,
whose peer has not sent its FIN yet), ``CLOSING`` (both sides closed, the
last bytes and FINs still to be sent or handed on) and ``LOST`` (the session
ended under the stream). What is still queued is data, not state: a FIN to
send waits behind the send buffer (it goes out when that buffer drains), a
FIN received waits in the receive buffer behind the bytes before it.

Every transition is in the two tables below; an event a state has no entry
for does not apply to it (a second FIN, a write after close) and changes
nothing. IntEnum, so that membership tests on the hot paths hash in C.
"""

from __future__ import annotations

from enum import IntEnum, auto

from threshold.wire.frames import FLAG_ACK, FLAG_SYN


class StreamState(IntEnum):
    """Where one stream is in its life."""

    #: Opened by us; the SYN is not sent yet (it rides on the first frame).
    INIT = auto()
    #: Opened by the peer; the ACK is not sent yet (it rides on the first frame).
    SYN_RECEIVED = auto()
    #: Opened by us, SYN sent; the peer's ACK has not arrived.
    SYN_SENT = auto()
    #: Open both ways.
    ESTABLISHED = auto()
    #: We closed our direction (FIN sent, or waiting behind buffered bytes).
    LOCAL_CLOSE = auto()
    #: The peer closed its direction (FIN received); we may still write.
    REMOTE_CLOSE = auto()
    #: Our protocol closed the stream (``loseConnection``): bytes the peer
    #: still sends are dropped while we wait, bounded by the linger time,
    #: for its FIN.
    LINGERING = auto()
    #: Both directions closed; what is buffered still goes out or is handed
    #: on, then the stream is closed.
    CLOSING = auto()
    #: Ended cleanly: both FINs exchanged, every byte delivered.
    CLOSED = auto()
    #: Ended by RST, sent or received (or the linger time ran out).
    RESET = auto()
    #: The session ended before the stream did.
    LOST = auto()


class StreamEvent(IntEnum):
    """What moves a stream from one state to another."""

    #: Our first frame for the stream went out (carrying SYN or ACK).
    SENT_OPEN = auto()
    #: The peer's frame carried ACK.
    ACK_RECEIVED = auto()
    #: Our protocol half-closed (``loseWriteConnection``).
    CLOSE_WRITE = auto()
    #: Our protocol closed the stream (``loseConnection``).
    CLOSE = auto()
    #: The peer's FIN arrived.
    FIN_RECEIVED = auto()
    #: Everything buffered went out and was handed on.
    DRAINED = auto()
    #: RST sent or received.
    RESET = auto()
    #: The session ended.
    SESSION_LOST = auto()


S = StreamState
E = StreamEvent

#: (state, event) -> next state. An event missing for a state is ignored.
STREAM_TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    (S.INIT, E.SENT_OPEN): S.SYN_SENT,
    (S.SYN_RECEIVED, E.SENT_OPEN): S.ESTABLISHED,
    (S.SYN_SENT, E.ACK_RECEIVED): S.ESTABLISHED,
    # Our half-close.
    (S.SYN_SENT, E.CLOSE_WRITE): S.LOCAL_CLOSE,
    (S.ESTABLISHED, E.CLOSE_WRITE): S.LOCAL_CLOSE,
    (S.REMOTE_CLOSE, E.CLOSE_WRITE): S.CLOSING,
    # Our full close: wait for the peer's FIN unless it came already.
    (S.SYN_SENT, E.CLOSE): S.LINGERING,
    (S.ESTABLISHED, E.CLOSE): S.LINGERING,
    (S.LOCAL_CLOSE, E.CLOSE): S.LINGERING,
    (S.REMOTE_CLOSE, E.CLOSE): S.CLOSING,
    (S.CLOSING, E.CLOSE): S.CLOSING,
    # The peer's half-close.
    (S.SYN_SENT, E.FIN_RECEIVED): S.REMOTE_CLOSE,
    (S.ESTABLISHED, E.FIN_RECEIVED): S.REMOTE_CLOSE,
    (S.LOCAL_CLOSE, E.FIN_RECEIVED): S.CLOSING,
    (S.LINGERING, E.FIN_RECEIVED): S.CLOSING,
    (S.CLOSING, E.DRAINED): S.CLOSED,
}
_LIVE = (
    S.INIT,
    S.SYN_RECEIVED,
    S.SYN_SENT,
    S.ESTABLISHED,
    S.LOCAL_CLOSE,
    S.REMOTE_CLOSE,
    S.LINGERING,
    S.CLOSING,
)
for _state in _LIVE:
    STREAM_TRANSITIONS[_state, E.RESET] = S.RESET
    STREAM_TRANSITIONS[_state, E.SESSION_LOST] = S.LOST
del _state

#: States in which our protocol may still write.
WRITABLE = frozenset(
    {S.INIT, S.SYN_RECEIVED, S.SYN_SENT, S.ESTABLISHED, S.REMOTE_CLOSE}
)
#: States in which the peer may still send Data (its FIN has not come).
PEER_SENDING = frozenset(
    {S.INIT, S.SYN_RECEIVED, S.SYN_SENT, S.ESTABLISHED, S.LOCAL_CLOSE, S.LINGERING}
)
#: States in which the stream is over and its protocol has been told.
ENDED = frozenset({S.CLOSED, S.RESET, S.LOST})

#: The flags our first frame carries, by the state it leaves.
OPENING_FLAGS = {S.INIT: FLAG_SYN, S.SYN_RECEIVED: FLAG_ACK}


def stream_next(state: StreamState, event: StreamEvent) -> StreamState | None:
    """The state ``event`` leads to from ``state``; None if it does not apply."""
    return STREAM_TRANSITIONS.get((state, event))


class SessionState(IntEnum):
    """Where a session is in its life."""

    #: Streams open both ways.
    OPEN = auto()
    #: The peer sent Go Away: we open no stream; we still accept its streams.
    PEER_GOING_AWAY = auto()
    #: We sent Go Away: no new stream either way; closing when the last ends.
    GOING_AWAY = auto()
    #: The transport is closing: nothing more that arrives is acted on.
    CLOSING = auto()
    #: The connection is gone; every stream has ended.
    CLOSED = auto()


class SessionEvent(IntEnum):
    """What moves a session from one state to another."""

    GO_AWAY_RECEIVED = auto()
    GO_AWAY_SENT = auto()
    CLOSE = auto()
    CONNECTION_LOST = auto()


T = SessionState
V = SessionEvent

SESSION_TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (T.OPEN, V.GO_AWAY_RECEIVED): T.PEER_GOING_AWAY,
    (T.OPEN, V.GO_AWAY_SENT): T.GOING_AWAY,
    (T.PEER_GOING_AWAY, V.GO_AWAY_SENT): T.GOING_AWAY,
    (T.OPEN, V.CLOSE): T.CLOSING,
    (T.PEER_GOING_AWAY, V.CLOSE): T.CLOSING,
    (T.GOING_AWAY, V.CLOSE): T.CLOSING,
    (T.OPEN, V.CONNECTION_LOST): T.CLOSED,
    (T.PEER_GOING_AWAY, V.CONNECTION_LOST): T.CLOSED,
    (T.GOING_AWAY, V.CONNECTION_LOST): T.CLOSED,
    (T.CLOSING, V.CONNECTION_LOST): T.CLOSED,
}

#: States in which we may open a stream.
OPENING_ALLOWED = frozenset({T.OPEN})
#: States in which the peer's new streams are accepted.
ACCEPTING = frozenset({T.OPEN, T.PEER_GOING_AWAY})
#: States in which what arrives is decoded and acted on.
READING = frozenset({T.OPEN, T.PEER_GOING_AWAY, T.GOING_AWAY})


def session_next(state: SessionState, event: SessionEvent) -> SessionState | None:
    """The state ``event`` leads to from ``state``; None if it does not apply."""
    return SESSION_TRANSITIONS.get((state, event))
