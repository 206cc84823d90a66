"""The client's session with the gateway: hello first, then serve its streams.

:class:`ClientSession` is the tunnel client's
:class:`~threshold.mux.interfaces.SessionHandler`: it owns one
:class:`~threshold.mux.session.MuxSession` (the connection's protocol),
says hello on stream 1 when the transport is up, and once the server
accepts serves each stream the server opens with a
:class:`~threshold.client.streams.ServiceStream`.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from threshold.client.streams import ServiceStream
from threshold.logs import observer as log_observer
from threshold.mux.session import MuxSession
from threshold.relay import tune_transport
from threshold.wire.handshake import (
    MAX_LINE,
    HandshakeError,
    encode_hello,
    parse_hello_reply,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IProtocol

    from threshold.client.settings import ClientSettings
    from threshold.mux.stream import Stream

log = Logger(observer=log_observer)

# Why a hello got no acceptable answer (the reply's own error follows
# REFUSED_BY_SERVER; the others are complete).
REFUSED_BY_SERVER = "server refused the hello"
BAD_REPLY = "bad hello reply"
NO_ANSWER = "no answer to the hello within {timeout}s"
STREAM_CLOSED = "stream 1 closed before the hello reply"
SESSION_CLOSED = "connection closed before the hello reply"


class HelloRefused(Exception):
    """The server refused the hello (or never answered); the message says why."""


class SessionState(enum.Enum):
    """Where the client's session is; the transitions are in ``_NEXT``."""

    #: Built; the transport is not up yet.
    CONNECTING = "connecting"
    #: The hello is on stream 1; waiting for the server's answer.
    HELLO_SENT = "hello sent"
    #: The server accepted: its streams are served.
    ACCEPTED = "accepted"
    #: Refused, unanswered or answered badly: the session is closing.
    REFUSED = "refused"
    #: The session has ended.
    CLOSED = "closed"


_NEXT: dict[SessionState, frozenset[SessionState]] = {
    SessionState.CONNECTING: frozenset({SessionState.HELLO_SENT, SessionState.CLOSED}),
    SessionState.HELLO_SENT: frozenset(
        {SessionState.ACCEPTED, SessionState.REFUSED, SessionState.CLOSED}
    ),
    SessionState.ACCEPTED: frozenset({SessionState.CLOSED}),
    SessionState.REFUSED: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


class ClientSession:
    """One connection to the gateway: the hello, then the server's streams.

    ``session`` is the connection's protocol. ``when_ready()`` says how the
    hello went: it fires with this object once the server accepts, or fails
    with :class:`HelloRefused` if it does not (refused, no answer within
    ``hello_timeout``, a bad answer, or the connection ended first).
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.state = SessionState.CONNECTING
        self.session = MuxSession(
            client=True,
            clock=settings.clock,
            handler=self,
            config=settings.session_config,
            name=f"session to {settings.server}",
        )
        self._hello_timer: IDelayedCall | None = None
        # How the hello went (self, or a HelloRefused Failure), once known.
        self._outcome: ClientSession | Failure | None = None
        self._ready_waiters: list[Deferred[ClientSession]] = []

    def when_ready(self) -> Deferred[ClientSession]:
        """A Deferred for the hello's outcome (see the class docstring)."""
        d: Deferred[ClientSession] = Deferred()
        if self._outcome is None:
            self._ready_waiters.append(d)
        elif isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)
        return d

    def _settle(self, outcome: ClientSession | Failure) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _move(self, state: SessionState) -> None:
        if state not in _NEXT[self.state]:
            raise AssertionError(f"client session: {self.state} -> {state}")
        self.state = state

    # -- SessionHandler -------------------------------------------------

    def session_started(self, session: MuxSession) -> None:
        """Say hello on stream 1 and wait, within ``hello_timeout``, for the answer."""
        tune_transport(session.transport)
        log.info("connected to {server}; sending hello", server=self.settings.server)
        self._move(SessionState.HELLO_SENT)
        stream = session.open_stream(HelloReader(self))
        stream.write(encode_hello(self.settings.client_id))
        # A server that accepts the connection but never answers the hello
        # must not hold the client: give up and back off like a refusal.
        self._hello_timer = self.settings.clock.callLater(
            self.settings.hello_timeout, self._hello_timed_out
        )

    def stream_opened(self, session: MuxSession, stream: Stream) -> IProtocol | None:
        """Serve the server's streams once the hello is accepted (else RST)."""
        if self.state is not SessionState.ACCEPTED:
            return None
        return ServiceStream(self.settings)

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        """Fail a pending hello; log the end of an accepted session."""
        was = self.state
        self._cancel_timer()
        self._move(SessionState.CLOSED)
        if was is SessionState.ACCEPTED:
            log.info(
                "tunnel to {server} down: {why}",
                server=self.settings.server,
                why=str(reason) or type(reason).__name__,
            )
        else:
            self._settle(Failure(HelloRefused(f"{SESSION_CLOSED}: {reason}")))

    # -- the hello ------------------------------------------------------

    def hello_answered(self, line: bytes) -> None:
        """The server's answer line arrived on stream 1."""
        if self.state is not SessionState.HELLO_SENT:
            return
        try:
            answer = parse_hello_reply(line)
        except HandshakeError as e:
            self.hello_failed(f"{BAD_REPLY}: {e}")
            return
        if not answer.ok:
            self.hello_failed(f"{REFUSED_BY_SERVER}: {answer.error}")
            return
        self._cancel_timer()
        self._move(SessionState.ACCEPTED)
        self.settings.stats.consecutive_refusals = 0
        log.info(
            "tunnel to {server} up as client {client_id}",
            server=self.settings.server,
            client_id=self.settings.client_id,
        )
        self._settle(self)

    def hello_failed(self, why: str) -> None:
        """No acceptable answer: log, count for the backoff, close."""
        if self.state is not SessionState.HELLO_SENT:
            return
        self._cancel_timer()
        self._move(SessionState.REFUSED)
        log.error("{server}: {error}", server=self.settings.server, error=why)
        self.settings.stats.consecutive_refusals += 1
        self._settle(Failure(HelloRefused(why)))
        self.session.close()

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        self.hello_failed(NO_ANSWER.format(timeout=self.settings.hello_timeout))

    def _cancel_timer(self) -> None:
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None


class HelloReader(LineOnlyReceiver):
    """Stream 1 on the client: read the server's one-line answer."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, client: ClientSession) -> None:
        self.client = client

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        """The answer: hand it over and close stream 1 (nothing else is on it)."""
        self.client.hello_answered(line)
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        """An answer longer than any the server sends."""
        self.client.hello_failed(
            f"{BAD_REPLY}: line longer than {self.MAX_LENGTH} bytes without a newline"
        )
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """Stream 1 ended; if no answer came first, the hello failed."""
        self.client.hello_failed(STREAM_CLOSED)


def session_factory(settings: ClientSettings) -> Factory:
    """The factory of connections to the gateway, for ``ClientService``.

    Each connection's protocol is a new :class:`ClientSession`'s
    ``session``; ``session.handler`` is the ClientSession.
    """
    return Factory.forProtocol(lambda: ClientSession(settings).session)
