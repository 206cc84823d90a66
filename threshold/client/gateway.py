"""One gateway the client holds a session to, across reconnections.

The client holds a session to each gateway of ``Servers`` at once; each
has a :class:`GatewayLink`: its address, the id its hello reply gave, where
it is now (one :class:`LinkState`, its transitions in ``_NEXT``), since
when and why, the hellos it refused in a row (its own backoff), and its
current session. Log lines, the reconnect policy and the admin API read it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from threshold.mux.session import MuxSession

__all__ = ["GatewayLink", "LinkEndpoint", "LinkState"]


class LinkState(enum.Enum):
    """Where the client is with one gateway."""

    #: Not started, or stopped.
    STOPPED = "stopped"
    #: A connection (TCP, TLS, the hello) is under way.
    CONNECTING = "connecting"
    #: The hello was accepted: the session serves the gateway's streams.
    CONNECTED = "connected"
    #: The gateway sent Go Away (it is draining): running streams finish,
    #: then the client reconnects with backoff.
    DRAINING = "draining"
    #: The last attempt failed or the session ended: waiting to reconnect.
    WAITING = "waiting"


_S = LinkState


class LinkSession(Protocol):
    """What a link keeps of a session (a ClientSession): its MuxSession."""

    session: MuxSession


_NEXT: dict[LinkState, frozenset[LinkState]] = {
    _S.STOPPED: frozenset({_S.CONNECTING}),
    _S.CONNECTING: frozenset({_S.CONNECTED, _S.WAITING, _S.STOPPED}),
    _S.CONNECTED: frozenset({_S.DRAINING, _S.WAITING, _S.STOPPED}),
    _S.DRAINING: frozenset({_S.WAITING, _S.STOPPED}),
    _S.WAITING: frozenset({_S.CONNECTING, _S.STOPPED}),
}


class GatewayLink:
    """One gateway: its name, its state across sessions, its backoff."""

    def __init__(self, address: str, clock: IReactorTime) -> None:
        #: ``host:port`` as configured (IPv6 in brackets).
        self.address = address
        #: The ``gateway`` id of the latest accepting hello reply, if any.
        self.gateway_id: str | None = None
        self.state = LinkState.STOPPED
        #: When the state last changed (clock seconds).
        self.since = clock.seconds()
        #: Why the latest attempt or session ended (None while it is fine).
        self.last_error: str | None = None
        #: Hellos refused (or unanswered) in a row; an accepted one resets
        #: it. The reconnect backoff grows with it.
        self.consecutive_refusals = 0
        #: Sessions accepted so far.
        self.sessions = 0
        #: The session of the latest connection (None before the first).
        self.session: LinkSession | None = None
        self._clock = clock

    @property
    def label(self) -> str:
        """The gateway in log lines: ``host:port``, and its id when known."""
        if self.gateway_id is None:
            return self.address
        return f"{self.address} (gateway {self.gateway_id})"

    @property
    def rtt(self) -> float | None:
        """The connected session's latest round trip (seconds), if measured."""
        if self.state is not LinkState.CONNECTED or self.session is None:
            return None
        return self.session.session.rtt

    def _move(self, state: LinkState, error: str | None = None) -> None:
        if state is self.state:
            return
        if state not in _NEXT[self.state]:
            raise AssertionError(f"gateway {self.address}: {self.state} -> {state}")
        self.state = state
        self.since = self._clock.seconds()
        if error is not None:
            self.last_error = error
        elif state is _S.CONNECTED:
            self.last_error = None

    # -- events -------------------------------------------------------------

    def connecting(self) -> None:
        """A connection attempt starts."""
        # The previous error stays visible until this attempt settles.
        self._move(_S.CONNECTING)

    def attached(self, session: LinkSession) -> None:
        """The connection is up; ``session`` says hello on it."""
        self.session = session

    def accepted(self, gateway_id: str | None) -> None:
        """The hello was accepted."""
        self.gateway_id = gateway_id
        self.consecutive_refusals = 0
        self.sessions += 1
        self._move(_S.CONNECTED)

    def refused(self, why: str) -> None:
        """The hello was refused or unanswered: counts for the backoff."""
        self.consecutive_refusals += 1
        self.failed(why)

    def draining(self) -> None:
        """The gateway sent Go Away."""
        if self.state is _S.CONNECTED:
            self._move(_S.DRAINING)

    def failed(self, why: str) -> None:
        """The attempt failed or the session ended: wait to reconnect."""
        if self.state is _S.STOPPED:
            return
        if self.state is _S.WAITING:
            self.last_error = why
            return
        self._move(_S.WAITING, why)

    def stopped(self) -> None:
        """The client stopped holding a session to this gateway."""
        self._move(_S.STOPPED)


class LinkEndpoint:
    """An endpoint that tells its link of each attempt and of its failure.

    Wraps the gateway's endpoint (TCP, TLS around it) for ``ClientService``,
    so that a connection that fails before any session exists is seen too.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, link: GatewayLink) -> None:
        self.endpoint = endpoint
        self.link = link

    def connect(self, factory: Any) -> Deferred[Any]:
        """Connect with the wrapped endpoint; a failure is the link's."""
        self.link.connecting()
        d = self.endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            self.link.failed(f"cannot connect: {failure.getErrorMessage()}")
            return failure

        d.addErrback(failed)
        return d
