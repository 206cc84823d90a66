"""The seams of the session layer.

- What a role gives a session: a role (the gateway's control connection,
  the tunnel client, a test) plugs into
  :class:`~threshold.mux.session.MuxSession` one way only, a
  :class:`SessionHandler`. The session never learns what the role is.
- What a stream needs of its session: :class:`StreamSession`, so that
  ``stream.py`` depends on this seam and not on ``session.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime

    from threshold.mux.budget import WindowBudget
    from threshold.mux.session import MuxSession
    from threshold.mux.settings import SessionConfig
    from threshold.mux.stream import Stream


class StreamSession(Protocol):
    """What a :class:`~threshold.mux.stream.Stream` uses of its session."""

    name: str
    clock: IReactorTime
    config: SessionConfig
    #: The session's share of receive window beyond the initial windows.
    budget: WindowBudget
    #: True while the transport's buffer is full: stream data must wait.
    write_blocked: bool

    @property
    def min_rtt(self) -> float | None:
        """The smallest recent round trip (seconds), None before the first."""

    def send_data(self, stream_id: int, flags: int, data: bytes) -> None:
        """Write one Data frame."""

    def send_window_update(self, stream_id: int, flags: int, delta: int) -> None:
        """Write one Window Update frame."""

    def send_control(self, stream_id: int, flags: int) -> None:
        """Write a flags-only frame (FIN, RST) for a stream."""

    def wait_for_writable(self, stream: Stream) -> None:
        """Call ``stream.session_writable()`` once the transport has room."""

    def stream_closed(self, stream: Stream) -> None:
        """``stream`` has ended: forget it."""

    def peer_address(self) -> IAddress | None:
        """The transport's peer address."""

    def host_address(self) -> IAddress | None:
        """The transport's local address."""


class SessionHandler(Protocol):
    """What a session tells the role that owns it.

    A handler may also have ``go_away_received(session, code)``, called as
    soon as the peer sends Go Away (before its last stream ends).
    """

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
