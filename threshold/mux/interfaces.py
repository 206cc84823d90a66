"""The seams of the session layer: what a role gives a session.

A role (the gateway's control connection, the tunnel client, a test) plugs
into :class:`~threshold.mux.session.MuxSession` one way only: it passes a
:class:`SessionHandler`. The session never learns what the role is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocol

    from threshold.mux.session import MuxSession
    from threshold.mux.stream import Stream


class SessionHandler(Protocol):
    """What a session tells the role that owns it."""

    def session_started(self, session: MuxSession) -> None:
        """The transport is up and the session registered as its producer."""

    def stream_opened(self, session: MuxSession, stream: Stream) -> IProtocol | None:
        """The peer opened ``stream``: the protocol to serve it, or None (RST)."""

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        """The session is over (every stream already ended), with why."""


class StreamAcceptor:
    """A handler that only serves the peer's streams, with ``accept(stream)``.

    For peers that need nothing at start or end: tests, benchmarks, tools.
    """

    def __init__(self, accept: Callable[[Stream], IProtocol | None]) -> None:
        self._accept = accept

    def session_started(self, session: MuxSession) -> None:
        """Nothing to do."""

    def stream_opened(self, session: MuxSession, stream: Stream) -> IProtocol | None:
        """Whatever ``accept`` says."""
        return self._accept(stream)

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        """Nothing to do."""
