"""Why a session or a stream ended, or could not be opened."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost

from threshold.wire.frames import GO_AWAY_NAMES


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


class StreamReset(ConnectionLost):
    """The peer reset the stream (RST)."""
