"""The seams of the session layer, importing neither the session nor the stream.

- What a stream needs of its session: :class:`StreamSession`, so that
  ``stream.py`` depends on this seam and not on ``session.py``; and the
  little a session calls on a stream that waits for room (:class:`Waiter`).
- :class:`StreamAcceptor`, the smallest
  :class:`~threshold.mux.session.SessionHandler` (the one way a role plugs
  into a session, declared beside :class:`~threshold.mux.session.MuxSession`
  which it names): it only serves the peer's streams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime

    from threshold.mux.budget import WindowBudget
    from threshold.mux.settings import SessionConfig


class Waiter(Protocol):
    """What a session calls on a stream (by id) once its transport has room."""

    id: int

    def session_writable(self) -> None:
        """The transport has room again."""


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

    def wait_for_writable(self, stream: Waiter) -> None:
        """Call ``stream.session_writable()`` once the transport has room."""

    def stream_closed(self, stream: Waiter) -> None:
        """``stream`` has ended: forget it."""

    def peer_address(self) -> IAddress | None:
        """The transport's peer address."""

    def host_address(self) -> IAddress | None:
        """The transport's local address."""


class StreamAcceptor:
    """A handler that only serves the peer's streams, with ``accept(stream)``.

    For peers that need nothing at start or end: tests, benchmarks, tools.
    (Its arguments are the session and the stream, typed loosely here so
    that this module imports neither.)
    """

    def __init__(self, accept: Callable[[Any], IProtocol | None]) -> None:
        self._accept = accept

    def session_started(self, session: object) -> None:
        """Nothing to do."""

    def stream_opened(self, session: object, stream: Any) -> IProtocol | None:
        """Whatever ``accept`` says."""
        return self._accept(stream)

    def session_ended(self, session: object, reason: BaseException) -> None:
        """Nothing to do."""
