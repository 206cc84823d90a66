"""Egress: a client's odd stream asks the gateway to connect out, then relays.

The stream starts with a request line (:mod:`threshold.wire.egress`). The
gateway checks, in this order: that it has an ``EgressPolicy`` at all
(``disabled``), that the client has an entry (``no_policy``), the
client's ``MaxEgressConnectionsPerClient`` (``limit``) and quota
(``quota_exceeded``). A name is resolved here, on the gateway
(``getaddrinfo`` in a thread); every address it gives is checked against
the client's rules (:class:`~threshold.config.egress.ClientEgress`) and
only addresses that pass are connected to, by IP, in the resolver's order:
no second lookup, so a name cannot slip a forbidden address in between
(DNS rebinding). Lookup and connection share ``EgressConnectTimeoutSeconds``.

Then one answer line: ok with the outgoing connection's local address, or
a refusal with its reason, after which the stream is closed (the session
stays up). Once connected the stream and the destination are spliced
(:mod:`threshold.relay`); bytes are counted per client in
:class:`~threshold.server.stats.EgressStats` and charged to the client's
quota and bandwidth buckets like its tunnels' bytes (a
:class:`~threshold.server.shaping.FlowMeter`). One log line per
connection when it ends: client, destination as asked and as connected,
result, bytes each way, duration.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.logs import observer as log_observer
from threshold.relay import PrefixRelay, RelayEnd, RelayState, tune_transport
from threshold.schema.kinds import format_address
from threshold.schema.policy_kinds import parse_ip
from threshold.wire.egress import (
    EgressError,
    EgressRefusal,
    EgressRequest,
    encode_answer,
    encode_refusal,
    parse_request,
)
from threshold.wire.handshake import HandshakeError, LineBuffer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from threshold.config.egress import ClientEgress
    from threshold.server.shaping import FlowMeter
    from threshold.server.stats import EgressFlow, GatewayStats

__all__ = ["MAX_ADDRESSES", "EgressPhase", "EgressStream", "Gate"]

log = Logger(observer=log_observer)

#: Resolved addresses tried per request, at most (one lookup can give many).
MAX_ADDRESSES = 8


class Gate(Protocol):
    """What an egress stream needs of the gateway (an ``EgressGate``)."""

    clock: IReactorTime
    stats: GatewayStats

    @property
    def connect_timeout(self) -> float:
        """``EgressConnectTimeoutSeconds``."""
        ...

    def rules(self, client_id: str) -> ClientEgress:
        """The client's rules (after :meth:`admit` let it in)."""
        ...

    def admit(self, client_id: str) -> tuple[EgressRefusal, str] | None:
        """A refusal and why, or None when the client may connect out now."""
        ...

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        """The IP addresses of a name."""
        ...

    def connect(
        self, host: str, port: int, target: RelayEnd, timeout: float
    ) -> Deferred[Any]:
        """Connect ``target`` to the IP address ``host``."""
        ...

    def meter(self, stream: EgressStream, target: RelayEnd) -> FlowMeter | None:
        """The stream's quota and bandwidth charge, if any applies."""
        ...

    def quiet_log(self, client_id: str, reason: EgressRefusal, why: str) -> None:
        """Log a refusal at most once a minute per client and reason."""
        ...


class EgressPhase(enum.Enum):
    """Where one egress stream is; moves only along ``_MOVES``."""

    #: Reading the request line.
    REQUEST = "request"
    #: Looking the name up.
    RESOLVING = "resolving"
    #: Connecting to an allowed address.
    CONNECTING = "connecting"
    #: Connected: relaying both ways.
    RELAYING = "relaying"
    #: Refused (answered with a reason) or failed.
    REFUSED = "refused"
    #: The stream ended.
    CLOSED = "closed"


_P = EgressPhase
_MOVES: dict[EgressPhase, frozenset[EgressPhase]] = {
    _P.REQUEST: frozenset({_P.RESOLVING, _P.CONNECTING, _P.REFUSED, _P.CLOSED}),
    _P.RESOLVING: frozenset({_P.CONNECTING, _P.REFUSED, _P.CLOSED}),
    _P.CONNECTING: frozenset({_P.RELAYING, _P.REFUSED, _P.CLOSED}),
    _P.RELAYING: frozenset({_P.CLOSED}),
    _P.REFUSED: frozenset({_P.CLOSED}),
    _P.CLOSED: frozenset(),
}

#: Connection errors and the reason they are answered with.
_CONNECT_ERRORS: tuple[tuple[type[BaseException], EgressRefusal], ...] = (
    (net_error.ConnectionRefusedError, EgressRefusal.CONNECTION_REFUSED),
    (net_error.TCPTimedOutError, EgressRefusal.TIMEOUT),
    (net_error.TimeoutError, EgressRefusal.TIMEOUT),
    (TimeoutError, EgressRefusal.TIMEOUT),
    (net_error.NoRouteError, EgressRefusal.UNREACHABLE),
)

#: Refusals logged at most once a minute per client (a client may repeat them
#: fast); the others are logged for each connection.
_QUIET = frozenset(
    {
        EgressRefusal.DISABLED,
        EgressRefusal.NO_POLICY,
        EgressRefusal.LIMIT,
        EgressRefusal.QUOTA_EXCEEDED,
        EgressRefusal.BAD_REQUEST,
    }
)


def _reason_of(failure: Failure) -> EgressRefusal:
    for kind, reason in _CONNECT_ERRORS:
        if failure.check(kind):
            return reason
    return EgressRefusal.FAILED


class _Target(RelayEnd):
    """The destination's end: counts the bytes that come back."""

    def __init__(self, stream: EgressStream) -> None:
        super().__init__()
        self.stream = stream

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Count, charge, relay to the stream."""
        self.stream.received(len(data))
        super().dataReceived(data)


class EgressStream(PrefixRelay):
    """An odd stream a client opened: request, checks, connection, relay."""

    def __init__(self, gate: Gate, client_id: str) -> None:
        super().__init__()
        self.gate = gate
        self.client_id = client_id
        self.phase = EgressPhase.REQUEST
        self.buffer = LineBuffer()
        self.request: EgressRequest | None = None
        self.rules: ClientEgress | None = None
        #: The address connected to (or the last one tried).
        self.address: str | None = None
        self.flow: EgressFlow | None = None
        self.meter: FlowMeter | None = None
        self.target: _Target | None = None
        self.started = gate.clock.seconds()
        self._pending: Deferred[Any] | None = None
        self._deadline = 0.0
        self._candidates: list[str] = []
        self._last_failure: tuple[EgressRefusal, str] | None = None
        self._counted = False
        #: Bytes the client sent while the connection was being made.
        self._early = 0
        #: What the name resolved to (None for an IP address asked).
        self.resolved: list[str] | None = None
        self.refusal: EgressRefusal | None = None
        self._result = ""

    def _move(self, phase: EgressPhase) -> None:
        if phase not in _MOVES[self.phase]:
            raise AssertionError(f"egress stream: {self.phase} -> {phase}")
        self.phase = phase

    @property
    def name(self) -> str:
        """The stream in log lines."""
        asked = self.request.address if self.request is not None else "?"
        return f"egress {self.client_id} stream {self.transport.id} to {asked}"

    # -- the request ----------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        """The request line comes first."""
        self.gate.stats.egress.started(self.client_id)
        self._counted = True
        self.read_prefix()

    def prefix_received(self, data: bytes) -> None:
        """Read the request line; then check it and connect."""
        try:
            line, rest = self.buffer.feed(data)
            if line is None:
                return
            self.request = parse_request(line)
        except (HandshakeError, EgressError) as e:
            self._refuse(EgressRefusal.BAD_REQUEST, f"bad egress request: {e}")
            return
        self.hold(rest)
        self._early = len(rest)
        refusal = self.gate.admit(self.client_id)
        if refusal is not None:
            self._refuse(*refusal)
            return
        self.rules = self.gate.rules(self.client_id)
        self._deadline = self.gate.clock.seconds() + self.gate.connect_timeout
        host = self.request.host
        if parse_ip(host) is not None:
            self._move(EgressPhase.CONNECTING)
            self._resolved([host])
            return
        self._move(EgressPhase.RESOLVING)
        self.resolved = []
        d = self.gate.resolve(host, self.request.port)
        d.addTimeout(self.gate.connect_timeout, self.gate.clock)
        self._pending = d
        d.addCallbacks(self._resolved, self._not_resolved)

    def prefix_ended(self) -> None:
        """The client closed before a whole request line: nothing to answer."""
        self._refuse(EgressRefusal.BAD_REQUEST, "stream closed before the request")

    # -- resolving and connecting ----------------------------------------------

    def _not_resolved(self, failure: Failure) -> None:
        self._pending = None
        if self.phase is not EgressPhase.RESOLVING:
            return
        if failure.check(TimeoutError):
            self._refuse(EgressRefusal.TIMEOUT, "name lookup timed out")
            return
        self._refuse(
            EgressRefusal.NAME_NOT_RESOLVED,
            f"name not resolved: {failure.getErrorMessage()}",
        )

    def _resolved(self, addresses: list[str]) -> None:
        self._pending = None
        if self.phase is EgressPhase.RESOLVING:
            self._move(EgressPhase.CONNECTING)
        if self.phase is not EgressPhase.CONNECTING:
            return
        assert self.request is not None and self.rules is not None
        port = self.request.port
        if self.resolved is not None:  # a name was looked up
            self.resolved = list(addresses)
        if not addresses:
            self._refuse(EgressRefusal.NAME_NOT_RESOLVED, "name has no address")
            return
        # Every address is checked; only those that pass are connected to.
        allowed = [a for a in addresses if self.rules.allowing(a, port) is not None]
        if not allowed:
            shown = ", ".join(addresses[:MAX_ADDRESSES])
            self._refuse(
                EgressRefusal.NOT_ALLOWED,
                f"no rule of client {self.client_id} allows {shown} port {port}",
            )
            return
        self._candidates = allowed[:MAX_ADDRESSES]
        self._try_next()

    def _try_next(self) -> None:
        assert self.request is not None
        left = self._deadline - self.gate.clock.seconds()
        if not self._candidates or left <= 0:
            reason, why = self._last_failure or (
                EgressRefusal.TIMEOUT,
                "no connection within the connect timeout",
            )
            self._refuse(reason, why)
            return
        self.address = self._candidates.pop(0)
        target = _Target(self)
        d = self.gate.connect(self.address, self.request.port, target, left)
        self._pending = d
        d.addCallbacks(lambda _: self._connected(target), self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self._pending = None
        if self.phase is not EgressPhase.CONNECTING:
            return
        assert self.request is not None and self.address is not None
        where = format_address(self.address, self.request.port)
        self._last_failure = (
            _reason_of(failure),
            f"cannot connect to {where}: {failure.getErrorMessage()}",
        )
        self._try_next()

    def _connected(self, target: _Target) -> None:
        self._pending = None
        if self.phase is not EgressPhase.CONNECTING or self.state not in (
            RelayState.HOLDING,
            RelayState.HELD_EOF,
        ):
            target.transport.loseConnection()
            return
        self._move(EgressPhase.RELAYING)
        tune_transport(target.transport)
        self.target = target
        self.flow = self.gate.stats.egress.connected(self.client_id)
        # What came after the request line goes out first (the meter
        # charges it to the quota as it starts).
        self.flow.bytes_out = self._early
        bound = target.transport.getHost()
        self.transport.write(encode_answer(bound.host, bound.port))
        self.meter = self.gate.meter(self, target)
        self.splice(target)

    # -- relaying ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Count and charge what the client sends out, then relay it."""
        flow = self.flow
        if flow is not None and self.state is RelayState.OPEN:
            flow.bytes_out += len(data)
            if self.meter is not None:
                self.meter.upload(len(data))
        elif self.state is RelayState.HOLDING:
            self._early += len(data)
        super().dataReceived(data)

    def received(self, count: int) -> None:
        """``count`` bytes came from the destination."""
        flow = self.flow
        if flow is not None:
            flow.bytes_in += count
            if self.meter is not None:
                self.meter.download(count)

    def cut(self) -> None:
        """Over quota with ``cut``: reset both sides."""
        self.give_up(abort=True)

    # -- the end ------------------------------------------------------------------

    def _refuse(self, reason: EgressRefusal, why: str) -> None:
        """Answer with the reason and close the stream (the session stays)."""
        if self.phase in (EgressPhase.REFUSED, EgressPhase.CLOSED):
            return
        self._move(EgressPhase.REFUSED)
        self.refusal = reason
        self.gate.stats.egress.refused(self.client_id, reason)
        self._result = f"refused ({reason.value}): {why}"
        if reason in _QUIET:
            self.gate.quiet_log(self.client_id, reason, why)
        if self.state not in (RelayState.CLOSING, RelayState.CLOSED):
            self.transport.write(encode_refusal(reason, why))
        self.give_up()

    def relay_closed(self, reason: Failure) -> None:
        """The stream ended: stop what is pending, count, log the connection."""
        was = self.phase
        # CLOSED first: the cancelled lookup or connection then ends quietly
        # (no refusal counted, no next address dialed).
        self._move(EgressPhase.CLOSED)
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        if self.meter is not None:
            self.meter.close()
        if self._counted:
            self.gate.stats.egress.ended(self.client_id, self.flow)
        if was is EgressPhase.REFUSED:
            if self.refusal in _QUIET:
                return  # logged by quiet_log
            result = self._result
        elif was is EgressPhase.RELAYING:
            result = f"closed: {reason.getErrorMessage()}"
        else:
            result = f"abandoned by the client while {was.value}"
        flow = self.flow
        if self.address is None or self.request is None:
            connection = "not connected"
        else:
            where = format_address(self.address, self.request.port)
            connected = self.flow is not None
            connection = f"connected to {where}" if connected else f"last tried {where}"
        log.info(
            "{name}: {result}; resolved to {resolved}; {connection}, {sent} bytes"
            " sent, {received} received, {duration:.3f}s",
            name=self.name,
            result=result,
            resolved=", ".join(self.resolved) if self.resolved else "-",
            connection=connection,
            sent=flow.bytes_out if flow is not None else 0,
            received=flow.bytes_in if flow is not None else 0,
            duration=self.gate.clock.seconds() - self.started,
            client_id=self.client_id,
        )
