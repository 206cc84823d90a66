"""The client's session with one gateway: hello first, then serve its streams.

:class:`ClientSession` is the tunnel client's
:class:`~threshold.mux.session.SessionHandler`: it owns one
:class:`~threshold.mux.session.MuxSession` (the connection's protocol),
says hello on stream 1 when the transport is up, and once the server
accepts serves each stream the server opens with a
:class:`~threshold.client.streams.ServiceStream`.

Stream 1 then stays open as the control channel
(:mod:`threshold.wire.control`): the client sends the health of its
checked services right after the hello is accepted and at each change.
A gateway that closes stream 1 after its reply (an older one) just has no
control channel; the session goes on.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from threshold.client.gateway import LinkState
from threshold.client.streams import ServiceStream
from threshold.logs import observer as log_observer
from threshold.mux.session import MuxSession
from threshold.relay import tune_transport
from threshold.wire.control import ControlError, Health, parse_control_line
from threshold.wire.handshake import (
    MAX_LINE,
    HandshakeError,
    encode_hello,
    parse_hello_reply,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IDelayedCall, IProtocol

    from threshold.client.gateway import GatewayLink
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
    """One connection to a gateway: the hello, then the server's streams.

    ``session`` is the connection's protocol. ``when_ready()`` says how the
    hello went: it fires with this object once the server accepts, or fails
    with :class:`HelloRefused` if it does not (refused, no answer within
    ``hello_timeout``, a bad answer, or the connection ended first).
    ``link`` is the gateway's :class:`~threshold.client.gateway.GatewayLink`,
    told of each step.
    """

    def __init__(self, settings: ClientSettings, link: GatewayLink) -> None:
        self.settings = settings
        self.link = link
        self.state = SessionState.CONNECTING
        self.session = MuxSession(
            client=True,
            clock=settings.clock,
            handler=self,
            config=settings.session_config,
            name=f"session to {link.label}",
        )
        link.attached(self)
        #: Stream 1's protocol, while the control channel is open.
        self.control: ControlChannel | None = None
        self._unsubscribe: Callable[[], None] | None = None
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
        log.info("connected to {server}; sending hello", server=self.link.label)
        self._move(SessionState.HELLO_SENT)
        self.control = ControlChannel(self)
        stream = session.open_stream(self.control)
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

    def go_away_received(self, session: MuxSession, code: int) -> None:
        """The gateway is leaving (draining): say so until the session ends.

        Stream 1 is closed too (as the gateway does on its side), so the
        session ends with the last user's stream.
        """
        if self.state is SessionState.ACCEPTED:
            self.link.draining()
            self._stop_reporting()
            if self.control is not None and not self.control.transport.disconnecting:
                self.control.transport.loseConnection()

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        """Fail a pending hello; log the end of an accepted session."""
        was = self.state
        self._cancel_timer()
        self._stop_reporting()
        self._move(SessionState.CLOSED)
        why = str(reason) or type(reason).__name__
        if was is SessionState.ACCEPTED:
            log.info("tunnel to {server} down: {why}", server=self.link.label, why=why)
            self.link.failed(f"session ended: {why}")
        else:
            failure = Failure(HelloRefused(f"{SESSION_CLOSED}: {reason}"))
            self._settle(failure)
            if was is not SessionState.REFUSED:
                self.link.failed(str(failure.value))

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
        self.link.accepted(answer.gateway)
        self.session.name = f"session to {self.link.label}"
        log.info(
            "tunnel to {server} up as client {client_id}",
            server=self.link.label,
            client_id=self.settings.client_id,
        )
        self._start_reporting()
        self._settle(self)

    def hello_failed(self, why: str) -> None:
        """No acceptable answer: log, count for the backoff, close."""
        if self.state is not SessionState.HELLO_SENT:
            return
        self._cancel_timer()
        self._move(SessionState.REFUSED)
        log.error("{server}: {error}", server=self.link.label, error=why)
        self.link.refused(why)
        self._settle(Failure(HelloRefused(why)))
        self.session.close()

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        self.hello_failed(NO_ANSWER.format(timeout=self.settings.hello_timeout))

    def _cancel_timer(self) -> None:
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None

    # -- the control channel ----------------------------------------------

    def _start_reporting(self) -> None:
        """Send the health known now, and each change from here on."""
        health = self.settings.health
        if health is None or self.control is None:
            return
        self._unsubscribe = health.subscribe(self.control.send)
        line = health.current_line()
        if line is not None:
            self.control.send(line)

    def _stop_reporting(self) -> None:
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()

    def control_line(self, line: bytes) -> None:
        """A line from the gateway on the control channel (none is known yet)."""
        try:
            message = parse_control_line(line)
        except ControlError as e:
            log.warn(
                "{server}: control channel: {error}", server=self.link.label, error=e
            )
            return
        kind = "health" if isinstance(message, Health) else "unknown"
        log.debug(
            "{server}: control message ({kind}) ignored",
            server=self.link.label,
            kind=kind,
        )

    def control_closed(self, reason: Failure) -> None:
        """Stream 1 ended: before the answer, the hello failed; after, only
        health reports stop (the session goes on)."""
        self.control = None
        if self.state is SessionState.HELLO_SENT:
            if self.session.closed:
                # The whole connection went (a TLS refusal, a reset): say why.
                self.hello_failed(f"{SESSION_CLOSED}: {reason.getErrorMessage()}")
            else:
                self.hello_failed(STREAM_CLOSED)
            return
        if self.state is not SessionState.ACCEPTED or self.session.closed:
            return
        self._stop_reporting()
        if self.settings.health is not None and self.link.state is LinkState.CONNECTED:
            log.info(
                "{server} closed the control channel (an older gateway?): health"
                " is not reported to it",
                server=self.link.label,
            )


@implementer(IPushProducer)
class ControlChannel(LineOnlyReceiver):
    """Stream 1 on the client: the hello reply, then control lines.

    Writing is flow-controlled by the stream: while it holds unsent bytes
    (the gateway not reading) only the latest line waits here, which is
    enough since each health line carries the full state.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, client: ClientSession) -> None:
        self.client = client
        self._answered = False
        self._paused = False
        self._pending: bytes | None = None

    def connectionMade(self) -> None:  # noqa: N802
        """Let the stream pause our writes."""
        self.transport.registerProducer(self, True)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        """The first line answers the hello; later ones are control lines."""
        if not self._answered:
            self._answered = True
            self.client.hello_answered(line)
            if self.client.state is not SessionState.ACCEPTED:
                self.transport.loseConnection()
            return
        self.client.control_line(line)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        """A line longer than any a gateway sends."""
        if not self._answered:
            self.client.hello_failed(
                f"{BAD_REPLY}: line longer than {self.MAX_LENGTH} bytes without a"
                " newline"
            )
            self.transport.loseConnection()
            return
        log.warn(
            "{server}: control line longer than {limit} bytes; control channel reset",
            server=self.client.link.label,
            limit=self.MAX_LENGTH,
        )
        # The gateway broke the channel's one rule: RST, not a polite close.
        self.transport.abortConnection()

    def send(self, line: bytes) -> None:
        """Send one control line (the latest one only, while paused)."""
        if self.transport is None or self.transport.disconnecting:
            return
        if self._paused:
            self._pending = line
            return
        self.transport.write(line)

    def pauseProducing(self) -> None:  # noqa: N802
        """The stream holds unsent bytes: keep lines here."""
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        """The stream has room: send the line that waited, if any."""
        self._paused = False
        line, self._pending = self._pending, None
        if line is not None:
            self.send(line)

    def stopProducing(self) -> None:  # noqa: N802
        """The stream is gone."""
        self._pending = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """Stream 1 ended."""
        self._pending = None
        self.client.control_closed(reason)


def session_factory(settings: ClientSettings, link: GatewayLink) -> Factory:
    """The factory of connections to one gateway, for ``ClientService``.

    Each connection's protocol is a new :class:`ClientSession`'s
    ``session``; ``session.handler`` is the ClientSession.
    """
    return Factory.forProtocol(lambda: ClientSession(settings, link).session)
