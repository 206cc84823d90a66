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
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.config.egress import NO_EGRESS_POLICY, ClientEgress
from threshold.logs import observer as log_observer
from threshold.relay import PrefixRelay, RelayEnd, RelayState, tune_transport
from threshold.schema.kinds import format_address
from threshold.schema.policy_kinds import parse_ip
from threshold.server.shaping import Direction, FlowMeter
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
    from twisted.internet.interfaces import IReactorTCP, IReactorTime

    from threshold.server.policy import GatewayPolicy
    from threshold.server.stats import EgressFlow, GatewayStats

__all__ = [
    "EgressGate",
    "EgressPhase",
    "EgressSettings",
    "EgressStream",
    "getaddrinfo_resolver",
]

log = Logger(observer=log_observer)

#: Resolved addresses tried per request, at most (one lookup can give many).
MAX_ADDRESSES = 8

#: ``resolve(host, port)``: the IP addresses of a name, in the order to try.
Resolver = Callable[[str, int], "Deferred[list[str]]"]


def _addresses(infos: list[Any]) -> list[str]:
    seen: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            host = sockaddr[0].split("%", 1)[0]
            if host not in seen:
                seen.append(host)
    return seen


def getaddrinfo_resolver(host: str, port: int) -> Deferred[list[str]]:
    """The addresses of ``host`` from the system's resolver, in a thread."""
    d = deferToThread(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    d.addCallback(_addresses)
    return d


@dataclass(frozen=True)
class EgressSettings:
    """What the gate needs from the server config."""

    #: ``EgressPolicy``: ClientId -> its rules; empty: egress is off.
    policies: Mapping[str, ClientEgress] = field(
        default_factory=lambda: NO_EGRESS_POLICY
    )
    max_per_client: int = 64
    connect_timeout: float = 10.0

    @classmethod
    def from_config(cls, config: Any) -> EgressSettings:
        """The settings of a :class:`~threshold.config.ServerConfig`."""
        return cls(
            policies=config.egress_policy,
            max_per_client=config.max_egress_connections_per_client,
            connect_timeout=config.egress_connect_timeout_seconds,
        )


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


class _OneShot(Factory):
    noisy = False

    def __init__(self, protocol: RelayEnd) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> RelayEnd:  # noqa: N802
        return self._protocol


class EgressStream(PrefixRelay):
    """An odd stream a client opened: request, checks, connection, relay."""

    def __init__(self, gate: EgressGate, client_id: str) -> None:
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
        refusal = self.gate.admit(self.client_id)
        if refusal is not None:
            self._refuse(*refusal)
            return
        self.rules = self.gate.settings.policies[self.client_id]
        self._deadline = self.gate.clock.seconds() + self.gate.settings.connect_timeout
        host = self.request.host
        if parse_ip(host) is not None:
            self._move(EgressPhase.CONNECTING)
            self._resolved([host])
            return
        self._move(EgressPhase.RESOLVING)
        self.resolved = []
        d = self.gate.resolve(host, self.request.port)
        d.addTimeout(self.gate.settings.connect_timeout, self.gate.clock)
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
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        was = self.phase
        self._move(EgressPhase.CLOSED)
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
        log.info(
            "{name}: {result}; resolved to {resolved}, connected to {address},"
            " {sent} bytes sent, {received} received, {duration:.3f}s",
            name=self.name,
            result=result,
            resolved=", ".join(self.resolved) if self.resolved else "-",
            address=format_address(self.address, self.request.port)
            if self.address is not None and self.request is not None
            else "none",
            sent=flow.bytes_out if flow is not None else 0,
            received=flow.bytes_in if flow is not None else 0,
            duration=self.gate.clock.seconds() - self.started,
            client_id=self.client_id,
        )


class EgressGate:
    """The gateway's egress: the policy in force, connections, counters.

    ``reactor`` connects out (and is the clock); ``resolve`` looks names
    up (:func:`getaddrinfo_resolver` by default); ``policy`` holds the
    clients' quota accounts and bandwidth buckets.
    """

    def __init__(
        self,
        settings: EgressSettings,
        reactor: Any,
        stats: GatewayStats,
        policy: GatewayPolicy | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.reactor: IReactorTCP = reactor
        self.clock: IReactorTime = reactor
        self.stats = stats
        self.policy = policy
        self.resolve: Resolver = resolve or getaddrinfo_resolver
        self._logged: dict[tuple[str, EgressRefusal], float] = {}

    def stream(self, client_id: str) -> EgressStream:
        """The protocol of an odd stream the client opened."""
        return EgressStream(self, client_id)

    def admit(self, client_id: str) -> tuple[EgressRefusal, str] | None:
        """Whether the client may connect out now (before looking at where)."""
        settings = self.settings
        if not settings.policies:
            return EgressRefusal.DISABLED, "egress is not enabled on this gateway"
        if client_id not in settings.policies:
            return (
                EgressRefusal.NO_POLICY,
                f"client {client_id} has no EgressPolicy entry",
            )
        # This stream is counted already.
        if self.stats.egress.open_count(client_id) > settings.max_per_client:
            return (
                EgressRefusal.LIMIT,
                f"{settings.max_per_client} egress connections open"
                " (MaxEgressConnectionsPerClient)",
            )
        if self.policy is not None:
            account = self.policy.quota.account(client_id)
            if account is not None and account.exceeded(self.clock.seconds()):
                return EgressRefusal.QUOTA_EXCEEDED, "the client is over its quota"
        return None

    def connect(
        self, host: str, port: int, target: RelayEnd, timeout: float
    ) -> Deferred[Any]:
        """Connect to the IP address ``host`` (never a name: no second lookup)."""
        endpoint = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        return endpoint(self.reactor, host, port, timeout=max(timeout, 0.001)).connect(
            _OneShot(target)
        )

    def meter(self, stream: EgressStream, target: _Target) -> FlowMeter | None:
        """The stream's quota and bandwidth charge, None when nothing applies.

        Bytes towards the client draw from its upload bucket (the direction
        of its tunnels' users' bytes), bytes out from its download bucket.
        """
        policy = self.policy
        flow = stream.flow
        if policy is None or flow is None:
            return None
        account = policy.quota.account(stream.client_id)
        buckets = policy.bandwidth.client_pair(stream.client_id)
        if account is None and buckets is None:
            return None
        out = back = None
        if buckets is not None:
            toward_client, away = buckets
            out = Direction(
                self.clock, (away,), lambda: stream.transport, lambda: target.transport
            )
            back = Direction(
                self.clock,
                (toward_client,),
                lambda: target.transport,
                lambda: stream.transport,
            )
        return FlowMeter(flow, self.clock, out, back, account, on_cut=stream.cut)  # type: ignore[arg-type]

    def quiet_log(self, client_id: str, reason: EgressRefusal, why: str) -> None:
        """Log a refusal a client may repeat fast: once a minute per reason."""
        now = self.clock.seconds()
        key = (client_id, reason)
        last = self._logged.get(key)
        if last is not None and now - last < 60:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged[key] = now
        log.info(
            "egress {client_id}: refused ({reason}): {why}"
            " (logged at most once a minute)",
            client_id=client_id,
            reason=reason.value,
            why=why,
        )
