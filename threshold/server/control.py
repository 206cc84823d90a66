"""Tunnel clients' control connections: admission, the hello, the session.

Each tunnel client holds one control connection, a yamux session. The
client opens stream 1 and says hello; until the hello is accepted the
server opens no stream and accepts no other. With TLS the hello's clientId
must match the certificate's Common Name (``ClientId`` or
``ClientId@Domain``). A client whose id is already connected replaces the
older connection (see :mod:`threshold.server.registry`).

Connections not yet past the hello are unauthenticated and cheap to open:
they share ``MaxPendingHandshakes`` slots, at most
``MaxPendingHandshakesPerSourceIp`` per source (an IPv6 /64 is one
source), and a newcomer may take back the oldest slot of the source that
holds the most (:mod:`threshold.server.admission`), so silent connections
cannot lock a real client out. Each has ``HandshakeTimeoutSeconds`` from
the TCP accept (the TLS handshake included) to a valid hello.

After the hello is accepted stream 1 stays open both ways: the control
channel (:mod:`threshold.wire.control`). The client sends the full health
of the services it checks, one JSON line at a time (at most ``MAX_LINE``
bytes); the registry keeps the latest. A malformed line is ignored (logged
at most once a minute per session), an over-long one resets stream 1 (the
health last known stays). The gateway closes stream 1 when the session
goes away, so the session can end once its streams are done.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from threshold.logs import observer as log_observer
from threshold.mux.budget import GATEWAY_WINDOW_BUDGET, WindowBudget
from threshold.mux.session import MuxSession, ProtocolViolation, SessionConfig
from threshold.relay import tune_transport
from threshold.server.addresses import DEFAULT_IPV6_PREFIX, source_of
from threshold.server.admission import Refusal, RefusedConnection, SourceShares
from threshold.server.certinfo import from_transport
from threshold.server.control_lines import ControlLines
from threshold.server.stats import HandshakeFailure, Limit
from threshold.tls import peer_common_name
from threshold.wire.frames import GO_AWAY_NORMAL
from threshold.wire.handshake import (
    MAX_LINE,
    HandshakeError,
    encode_hello_reply,
    parse_hello,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime
    from twisted.python.failure import Failure

    from threshold.mux.stream import Stream
    from threshold.server.egress import EgressStream
    from threshold.server.egress_gate import EgressGate
    from threshold.server.registry import ClientRegistry

__all__ = [
    "MOVES",
    "ControlConnection",
    "ControlFactory",
    "ControlSettings",
    "ControlState",
]

log = Logger(observer=log_observer)


class ControlState(enum.Enum):
    """Where one control connection is; moves only along :data:`MOVES`."""

    #: Accepted by TCP, waiting for the TLS handshake and stream 1.
    PENDING = "pending"
    #: Stream 1 is open; the hello line is being read.
    READING_HELLO = "reading hello"
    #: The hello was accepted: the client is in the registry.
    ACCEPTED = "accepted"
    #: The handshake was refused; the connection is closing.
    REFUSED = "refused"
    #: The session has ended.
    CLOSED = "closed"


MOVES: dict[ControlState, frozenset[ControlState]] = {
    ControlState.PENDING: frozenset(
        {ControlState.READING_HELLO, ControlState.REFUSED, ControlState.CLOSED}
    ),
    ControlState.READING_HELLO: frozenset(
        {ControlState.ACCEPTED, ControlState.REFUSED, ControlState.CLOSED}
    ),
    ControlState.ACCEPTED: frozenset({ControlState.CLOSED}),
    ControlState.REFUSED: frozenset({ControlState.CLOSED}),
    ControlState.CLOSED: frozenset(),
}

#: States that hold a pending-handshake slot (a refused connection holds
#: its socket until it is closed).
_UNAUTHENTICATED = frozenset(
    {ControlState.PENDING, ControlState.READING_HELLO, ControlState.REFUSED}
)
#: States the handshake timeout runs in.
_TIMED = frozenset({ControlState.PENDING, ControlState.READING_HELLO})


@dataclass(frozen=True)
class ControlSettings:
    """What the control listener needs from the server config."""

    use_tls: bool = False
    domain: str | None = None
    handshake_timeout: float = 10.0
    max_clients: int = 1000
    max_pending_handshakes: int = 100
    #: Pending slots one source may hold; 0: no per-source cap.
    max_pending_per_source: int = 8
    #: IPv6 sources sharing this prefix are one source.
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    session: SessionConfig = SessionConfig()
    #: Receive window every client session's streams may grow by together
    #: (each session also within its own ``session.window_budget``).
    gateway_window_budget: int = GATEWAY_WINDOW_BUDGET
    #: Sent in the hello reply when set (``"gateway"``), so a client of
    #: several gateways can tell them apart.
    gateway_id: str | None = None


class ControlCounters(Protocol):
    """Where the control listener counts what it refuses."""

    def handshake_failed(self, reason: HandshakeFailure) -> None:
        """One handshake refused, for this reason."""

    def limit_hit(self, limit: Limit, **where: object) -> None:
        """One hit of ``limit``; ``where``: whose (``source=``)."""


_READ = frozenset({ControlState.READING_HELLO, ControlState.ACCEPTED})


class ControlChannel(LineOnlyReceiver):
    """Stream 1 on the server: the hello line, then control lines.

    Every line is at most ``MAX_LINE`` bytes; the control connection judges
    each one.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, control: ControlConnection) -> None:
        self.control = control

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Read while the hello is awaited and once it is accepted."""
        if self.control.state in _READ:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        """A hello, or a control line once the hello is accepted."""
        if self.control.state is ControlState.READING_HELLO:
            self.control.hello_received(line)
        elif self.control.state is ControlState.ACCEPTED:
            self.control.control_line(line)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        """No newline within the bound: refuse the hello, or reset stream 1."""
        self._buffer = b""
        if self.control.state is ControlState.ACCEPTED:
            self.control.control_line_too_long()
            return
        self.control.hello_failed(
            f"hello longer than {self.MAX_LENGTH} bytes without a newline",
            HandshakeFailure.BAD_HELLO,
        )

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        """Stream 1 ended: a failure if the hello had not come yet."""
        self.control.hello_stream_closed()


class ControlConnection:
    """The server side of one client's control connection (a SessionHandler)."""

    def __init__(self, factory: ControlFactory, source: str, peer: str) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.clock = factory.clock
        self.source = source
        self.peer = peer
        self.state = ControlState.PENDING
        self.client_id: str | None = None
        self._hello_stream: Stream | None = None
        self._timeout: IDelayedCall | None = None
        self._channel: ControlLines | None = None
        self.session = MuxSession(
            client=False,
            clock=self.clock,
            handler=self,
            config=self.settings.session,
            name=f"control connection from {peer}",
            budget=factory.window_budget,
        )

    def __repr__(self) -> str:
        return f"<ControlConnection {self.session.name} {self.state.value}>"

    def _move(self, state: ControlState) -> None:
        if state not in MOVES[self.state]:
            raise AssertionError(f"{self!r}: no move to {state.value}")
        self.state = state
        if state not in _UNAUTHENTICATED:
            self.factory.pending.release(self)
        if state not in _TIMED:
            self._cancel_timeout()

    # -- SessionHandler ---------------------------------------------------

    def session_started(self, session: MuxSession) -> None:
        """The transport is up: start the handshake clock (TLS included)."""
        tune_transport(session.transport)
        self._timeout = self.clock.callLater(
            self.settings.handshake_timeout, self._handshake_timed_out
        )

    def stream_opened(
        self, session: MuxSession, stream: Stream
    ) -> ControlChannel | EgressStream | None:
        """Stream 1 before the hello, odd streams (egress) after it; no other."""
        if self.state is ControlState.PENDING and stream.id == 1:
            self._hello_stream = stream
            self._move(ControlState.READING_HELLO)
            return ControlChannel(self)
        egress = self.factory.egress
        if (
            egress is not None
            and self.state is ControlState.ACCEPTED
            and self.client_id is not None
            and stream.id % 2 == 1
        ):
            # Odd streams after the hello are the client's egress requests
            # (answered, even when egress is off: docs/egress.md).
            return egress.stream(self.client_id)
        log.debug(
            "{name}: stream {stream_id} refused (not a tunnel stream)",
            name=session.name,
            stream_id=stream.id,
        )
        return None

    def go_away_received(self, session: MuxSession, code: int) -> None:
        """The client is leaving: the registry shows it closed at once.

        Stream 1 is closed too, so the session ends with its last stream.
        """
        if self.state is ControlState.ACCEPTED and self.client_id is not None:
            self.factory.registry.closing(self.client_id, session)
            self._close_control_stream()

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """End the session from our side: close stream 1, then Go Away.

        The session then closes once the users' streams are done (with a
        non-normal code, at once).
        """
        self._close_control_stream()
        self.session.go_away(code)

    def _close_control_stream(self) -> None:
        stream = self._hello_stream
        if stream is not None and not stream.disconnecting:
            stream.loseConnection()

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        """Forget the connection; a connected client becomes closed."""
        was = self.state
        self._move(ControlState.CLOSED)
        self.factory.connections.discard(self)
        if was is ControlState.ACCEPTED and self.client_id is not None:
            self.factory.registry.disconnected(self.client_id, session, reason)
        log.info(
            "{name}: control connection closed: {why}",
            name=session.name,
            why=_why(reason),
        )

    # -- the hello ----------------------------------------------------------

    def hello_received(self, line: bytes) -> None:
        """Check a hello; accept the client or refuse with a reason."""
        if self.state is not ControlState.READING_HELLO:
            return
        try:
            hello = parse_hello(line)
        except HandshakeError as e:
            self.hello_failed(str(e), HandshakeFailure.BAD_HELLO)
            return
        if self.settings.use_tls:
            expected = hello.client_id
            if self.settings.domain:
                expected = f"{hello.client_id}@{self.settings.domain}"
            name = peer_common_name(self.session.transport)
            if name != expected:
                self.hello_failed(
                    f'clientId "{hello.client_id}" does not match the '
                    f'certificate (CN "{name}", expected "{expected}")',
                    HandshakeFailure.IDENTITY,
                )
                return
        registry = self.factory.registry
        if (
            not registry.is_connected(hello.client_id)
            and registry.connected_count() >= self.settings.max_clients
        ):
            self.hello_failed(
                f"server full: {self.settings.max_clients} clients connected",
                HandshakeFailure.SERVER_FULL,
            )
            return
        self._move(ControlState.ACCEPTED)
        self.client_id = hello.client_id
        self.session.name = f"client {hello.client_id} ({self.peer})"
        cert = from_transport(self.session.transport)
        registry.connected(
            hello.client_id,
            self.session,
            self.peer,
            retire=self.go_away,
            certificate_not_after=cert.not_after if cert is not None else None,
        )
        self._channel = ControlLines(
            registry, hello.client_id, self.session, self.clock
        )
        assert self._hello_stream is not None
        self._hello_stream.write(
            encode_hello_reply(True, gateway=self.settings.gateway_id)
        )
        # Stream 1 stays open: the control channel.

    def control_line(self, line: bytes) -> None:
        """One line on the control channel after the hello."""
        if self._channel is not None:
            self._channel.line_received(line)

    def control_line_too_long(self) -> None:
        """No newline within MAX_LINE: stream 1 is reset, the health kept."""
        if self._channel is not None:
            self._channel.line_too_long()
        if self._hello_stream is not None:
            self._hello_stream.abortConnection()

    def hello_stream_closed(self) -> None:
        """Stream 1 ended; before a hello that fails the handshake."""
        if self.state is ControlState.READING_HELLO:
            self._refuse(
                "stream 1 closed before the hello", HandshakeFailure.CLOSED, False
            )
        elif self.state is ControlState.ACCEPTED and not self.session.closed:
            log.debug(
                "{name}: control channel closed; health stays as last reported",
                name=self.session.name,
            )

    def hello_failed(self, why: str, reason: HandshakeFailure) -> None:
        """Refuse the client: answer with ``why`` on stream 1, then Go Away."""
        if self.state is ControlState.READING_HELLO:
            self._refuse(why, reason, True)

    def _refuse(self, why: str, reason: HandshakeFailure, answer: bool) -> None:
        self._move(ControlState.REFUSED)
        self.factory.counters.handshake_failed(reason)
        log.warn("{name}: handshake refused: {why}", name=self.session.name, why=why)
        if answer and self._hello_stream is not None:
            self._hello_stream.write(encode_hello_reply(False, why))
            self._hello_stream.loseWriteConnection()
        self.session.close(GO_AWAY_NORMAL)

    def _handshake_timed_out(self) -> None:
        self._timeout = None
        timeout = self.settings.handshake_timeout
        if self.state is ControlState.READING_HELLO:
            self.hello_failed(f"no hello within {timeout}s", HandshakeFailure.TIMEOUT)
        elif self.state is ControlState.PENDING:
            # No stream 1: maybe not even TLS. Nobody to answer, so no
            # Go Away waiting on a TLS handshake that may never end.
            self._move(ControlState.REFUSED)
            self.factory.counters.handshake_failed(HandshakeFailure.TIMEOUT)
            log.warn(
                "{name}: handshake refused: no hello stream within {timeout}s",
                name=self.session.name,
                timeout=timeout,
            )
            self._abort()

    def evict(self) -> None:
        """A newcomer took this connection's pending slot: cut it."""
        log.warn(
            "{name}: cut before its hello: {source} holds the most pending "
            "handshakes (MaxPendingHandshakes)",
            name=self.session.name,
            source=self.source,
        )
        if self.state is not ControlState.REFUSED:
            self._move(ControlState.REFUSED)
        self._abort()

    def _abort(self) -> None:
        transport = self.session.transport
        if transport is not None:
            transport.abortConnection()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


def _why(reason: BaseException) -> str:
    if isinstance(reason, ProtocolViolation):
        return f"protocol error: {reason}"
    return str(reason) or type(reason).__name__


def describe_peer(address: object) -> str:
    """``host:port`` of a peer address, with brackets around IPv6."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return "unknown" if address is None else str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ControlFactory(Factory):
    """Builds a session per accepted control connection, within the shares.

    ``connections`` are the live control connections (for a graceful
    stop), ``pending`` the slots of those not past the hello,
    ``window_budget`` the receive window all their sessions share.
    """

    def __init__(
        self,
        registry: ClientRegistry,
        settings: ControlSettings,
        clock: IReactorTime,
        counters: ControlCounters,
        egress: EgressGate | None = None,
    ) -> None:
        self.registry = registry
        #: Serves the clients' odd streams (egress); None: they are reset.
        self.egress = egress
        self.settings = settings
        self.clock = clock
        self.counters = counters
        self.connections: set[ControlConnection] = set()
        self.pending: SourceShares[ControlConnection] = SourceShares(
            settings.max_pending_handshakes,
            settings.max_pending_per_source,
            evict=True,
        )
        self.window_budget = WindowBudget(settings.gateway_window_budget)

    def buildProtocol(self, addr: object) -> MuxSession | RefusedConnection:  # noqa: N802
        """One control connection; past the shares, one cut at once."""
        source = source_of(addr, self.settings.ipv6_prefix)
        peer = describe_peer(addr)
        control = ControlConnection(self, source, peer)
        admission = self.pending.admit(source, control)
        if not admission.admitted:
            if admission.refusal is Refusal.PER_SOURCE:
                self.counters.limit_hit(
                    Limit.PENDING_HANDSHAKES_PER_SOURCE, source=source
                )
                log.warn(
                    "control connection from {peer} refused: {source} has "
                    "{count} handshakes pending (MaxPendingHandshakesPerSourceIp)",
                    peer=peer,
                    source=source,
                    count=self.pending.count(source),
                )
            else:
                self.counters.limit_hit(Limit.PENDING_HANDSHAKES)
                log.warn(
                    "control connection from {peer} refused: {count} handshakes "
                    "pending (MaxPendingHandshakes)",
                    peer=peer,
                    count=len(self.pending),
                )
            return RefusedConnection()
        if admission.evicted is not None:
            self.counters.limit_hit(Limit.PENDING_HANDSHAKES)
            admission.evicted.evict()
        self.connections.add(control)
        return control.session
