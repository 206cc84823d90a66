"""The public listeners: accept internet users and relay them into streams.

One :class:`FrontendFactory` per tunnel group ``(ListenAddress,
ListenPort)``. At each accepted connection it looks the group's entries up
in the route table (so a ``PUT /tunnels`` that moves a tunnel affects the
next connection, never a running one):

- the caps are checked first (:mod:`threshold.server.public_admission`);
- a group whose only entry is ``*`` forwards at once, reading nothing, so
  protocols where the server speaks first work;
- otherwise the TLS ClientHello is read (:mod:`threshold.server.sni`,
  bounded in size, records, reads and time), the SNI name picks the entry,
  and the bytes read are replayed unchanged.

The entry's client is chosen by its ``Balance`` among its healthy clients
(:mod:`threshold.server.serving`); with none healthy the user is closed
(``no_healthy_client``). The stream to the client starts with the service
header, then the PROXY header when the tunnel asks for it, then the user's
bytes, all written without waiting for the client's ACK: no round trip is
added. The opening bytes are built before the stream is opened, and any
failure after it is opened resets the stream and closes the user, so
nothing is left behind. A stream the client resets before any byte came
back is retried once on the next healthy client
(:mod:`threshold.server.retry`).

A :class:`PublicConnection`'s state is its :class:`~threshold.relay.RelayState`:
NEW (admitting), PREFIX (reading the ClientHello), then OPEN and the
half-closed states (routed), CLOSED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from threshold.logs import debugging, emit_line
from threshold.logs import observer as log_observer
from threshold.mux.session import SessionClosed, StreamLimitReached
from threshold.relay import RelayState, tune_transport
from threshold.server.addresses import DEFAULT_IPV6_PREFIX
from threshold.server.public_admission import PublicAdmission
from threshold.server.retry import Replay, RetryingRelay, StreamSide
from threshold.server.routes import (
    GroupKey,
    Tunnel,
    format_address,
    needs_sni,
    select_route,
)
from threshold.server.serving import describe
from threshold.server.sni import SniReader
from threshold.server.stats import Flow, GatewayStats, Limit, Refusal
from threshold.wire import clienthello, proxyheader
from threshold.wire.handshake import encode_stream_header

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from threshold.mux.session import MuxSession
    from threshold.server.routes import RouteTable
    from threshold.server.serving import TunnelView
    from threshold.server.shaping import FlowMeter

log = Logger(observer=log_observer)

#: A tunnel's service header, built once per service name, not per user
#: (a JSON encoding each time, about 1% of the gateway's busy time).
_service_header = lru_cache(maxsize=4096)(encode_stream_header)


class TunnelClients(Protocol):
    """What the front end asks of the clients (the serving table)."""

    def candidates(self, tunnel: Tunnel) -> list[str]:
        """The healthy clients for one new connection, best first."""
        ...

    def session_for(self, client_id: str) -> MuxSession | None:
        """The client's session, if connected."""
        ...

    def is_healthy(self, tunnel: Tunnel, client_id: str) -> bool:
        """Whether the client may take the tunnel's connections now."""
        ...

    def view(self, tunnel: Tunnel) -> TunnelView:
        """Each client's state for the tunnel (why none is healthy)."""
        ...


_RELAYING = frozenset({RelayState.OPEN, RelayState.WRITE_SHUT, RelayState.READ_SHUT})


@dataclass(frozen=True)
class FrontendLimits:
    """Bounds on what internet users can hold."""

    sni_timeout: float = 10.0
    max_hello: int = clienthello.DEFAULT_MAX_SIZE
    #: Concurrent connections on one tunnel socket; 0: no limit.
    max_per_tunnel: int = 10000
    #: Concurrent connections from one source, all tunnels; 0: no limit.
    max_per_ip: int = 256
    #: Close connections idle this long; 0: never.
    idle_timeout: float = 0.0
    #: Close relayed connections with no byte either way this long; 0: never.
    first_byte_timeout: float = 30.0
    #: IPv6 sources sharing this prefix count as one source.
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    #: One info line per relayed connection when it ends (``LogConnections``).
    log_connections: bool = True


class PublicConnection(RetryingRelay, TimeoutMixin):
    """An internet user's connection on a tunnel port.

    One timer (TimeoutMixin) serves the phases in turn: the SNI read's
    deadline, then the first-byte timeout (no byte either way since it was
    routed), then the idle timeout.
    """

    tunnel: Tunnel | None = None
    flow: Flow | None = None
    #: Bandwidth shaping and quota counting, when a limit applies (policy.py).
    meter: FlowMeter | None = None

    def __init__(self, factory: FrontendFactory) -> None:
        super().__init__()
        self.factory = factory
        self.clock = factory.clock
        # TimeoutMixin schedules with the global reactor unless told.
        self.callLater = factory.clock.callLater
        self.started = 0.0
        self._sni: SniReader | None = None

    @property
    def bytes_in(self) -> int:
        """Bytes relayed from the user to the service."""
        return self.flow.bytes_in if self.flow is not None else 0

    @property
    def bytes_out(self) -> int:
        """Bytes relayed from the service to the user."""
        return self.flow.bytes_out if self.flow is not None else 0

    # -- admitting ----------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        """Check the caps, then route at once or read the ClientHello."""
        factory = self.factory
        stats = factory.stats
        stats.accepted += 1
        self.started = self.clock.seconds()
        denied = factory.admission.admit(self, factory.key, self.transport.getPeer())
        if denied is not None:
            stats.refuse(denied.reason)
            stats.limit_hit(
                denied.limit, tunnel=factory.key, source=self.transport.getPeer().host
            )
            log.warn(
                "{peer} on {group} refused: {why} (limit)",
                peer=self._peer(),
                group=self._group(),
                why=denied.why,
            )
            self.give_up(abort=True)
            return
        stats.open += 1
        tune_transport(self.transport)
        entries = factory.routes.group(factory.key)
        if not entries:
            self._refuse(Refusal.NO_ROUTE, "no tunnel on this address any more")
        elif not needs_sni(entries):
            self._route(entries[0], b"")
        else:
            self._sni = SniReader(factory.limits.max_hello)
            self.read_prefix()
            self.setTimeout(factory.limits.sni_timeout)

    # -- reading the ClientHello -------------------------------------------

    def prefix_received(self, data: bytes) -> None:
        """Feed the ClientHello reader; route once it has an answer."""
        sni = self._sni
        if sni is None:
            return
        result = sni.feed(data)
        if isinstance(result, clienthello.NeedMore):
            return
        self.setTimeout(None)
        self._sni = None
        stats = self.factory.stats
        if isinstance(result, clienthello.NotTls):
            stats.sni_not_tls += 1
            if result.bounded:
                stats.limit_hit(Limit.CLIENT_HELLO)
            log.debug(
                "{peer} on {group}: not a TLS ClientHello: {why}",
                peer=self._peer(),
                group=self._group(),
                why=result.reason,
            )
            name = None
        else:
            name = result.server_name
        route = select_route(self.factory.routes.group(self.factory.key), name)
        if route is None:
            self._refuse(Refusal.NO_ROUTE, f"no tunnel for server name {name!r}")
            return
        self._route(route, sni.replay())

    # -- routing ------------------------------------------------------------

    def _route(self, tunnel: Tunnel, first_bytes: bytes) -> None:
        factory = self.factory
        candidates = factory.clients.candidates(tunnel)
        # The access policy (source lists, quota, rate) may drop candidates;
        # a refusal is counted and logged there, before any stream exists.
        if factory.admission.check(self, tunnel, candidates) is not None:
            self.give_up(abort=True)
            return
        if not candidates:
            self._refuse(Refusal.NO_HEALTHY_CLIENT, self._no_client(tunnel))
            return
        # Everything that can fail on the tunnel's own fields is done before
        # the stream exists: nothing to undo on either session.
        try:
            opening = self._opening(tunnel)
        except Exception as e:
            self._refuse(
                Refusal.TUNNEL_ERROR,
                f"tunnel to {', '.join(tunnel.client_ids)}/"
                f"{tunnel.backend_service!r} cannot be served: {e}",
                warn=True,
            )
            return
        why = ""
        for index, client_id in enumerate(candidates):  # noqa: B007
            session = factory.clients.session_for(client_id)
            if session is None:
                continue
            stream_end = StreamSide(self, client_id)
            # The SYN and the opening bytes go out as one write (one TLS
            # record): uncorked once the relay is set up, below.
            session.cork()
            try:
                stream = session.open_stream(stream_end)
            except StreamLimitReached as e:
                session.uncork()
                factory.stats.limit_hit(Limit.STREAMS_PER_SESSION)
                why = str(e)
                continue
            except SessionClosed as e:
                session.uncork()
                why = str(e)
                continue
            break
        else:
            self._refuse(
                Refusal.NO_HEALTHY_CLIENT,
                f"no client of {describe(tunnel)} could open a stream: {why}",
            )
            return
        try:
            first = [*opening, first_bytes]
            self._relay(tunnel, stream_end, first, candidates[index + 1 :])
        except Exception:
            # Release everything: the RST ends the stream on both sessions,
            # the abort ends the user's connection (and its slot, counters).
            log.failure(
                "{peer} on {group}: relay into stream {stream_id} failed; reset",
                peer=self._peer(),
                group=self._group(),
                stream_id=stream.id,
            )
            factory.stats.refuse(Refusal.TUNNEL_ERROR)
            self.replay = None
            stream.abortConnection()
            self.give_up(abort=True)
            return
        finally:
            session.uncork()
        if not debugging():
            return  # the fields below cost more than the filtered event
        log.debug(
            "{peer} on {group} -> client {client} service {service} (stream "
            "{stream_id})",
            peer=self._peer(),
            group=self._group(),
            client=client_id,
            service=tunnel.backend_service,
            stream_id=stream.id,
        )

    def _no_client(self, tunnel: Tunnel) -> str:
        states = "; ".join(
            f"{c.client_id}: {c.reason}"
            for c in self.factory.clients.view(tunnel).clients
        )
        return f"no healthy client for {describe(tunnel)} ({states})"

    def _opening(self, tunnel: Tunnel) -> list[bytes]:
        """The service header and, if asked for, the PROXY header."""
        opening = [_service_header(tunnel.backend_service)]
        if tunnel.proxy_protocol:
            opening.append(
                proxyheader.build(
                    tunnel.proxy_protocol_version,
                    self.transport.getPeer(),
                    self.transport.getHost(),
                )
            )
        return opening

    def _relay(
        self,
        tunnel: Tunnel,
        stream_end: StreamSide,
        first: list[bytes],
        others: Sequence[str],
    ) -> None:
        self.tunnel = tunnel
        self.flow = self.factory.stats.flow_opened(tunnel.key, stream_end.client_id)
        self.flow.bytes_in = len(first[-1])
        if others:
            # A reset before any byte back is retried on the others.
            self.replay = Replay(first, others)
        # Header, PROXY header and the bytes read so far go out as one Data
        # frame, right behind the SYN: the client needs no round trip.
        self.splice(stream_end, first)
        self.meter = self.factory.admission.meter(self, tunnel)
        self.arm_quiet_timer()

    # -- relaying -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Count what is relayed to the service (reset the quiet timer)."""
        flow = self.flow
        replay = self.replay
        if replay is not None and self.state is RelayState.OPEN:
            replay.sent(data)
        if flow is not None and self.state in _RELAYING:
            if flow.bytes_in or flow.bytes_out:
                self.resetTimeout()
                flow.bytes_in += len(data)
            else:
                flow.bytes_in += len(data)
                self.arm_quiet_timer()
            meter = self.meter
            if meter is not None:
                meter.upload(len(data))
        super().dataReceived(data)

    def _quiet_limit(self) -> tuple[float, Refusal] | None:
        """The timeout that applies to a routed connection now, if any.

        Before its first byte (either way) a connection is idle since it was
        routed, so the shorter of the two timeouts applies.
        """
        limits = self.factory.limits
        options = []
        if limits.idle_timeout:
            options.append((limits.idle_timeout, Refusal.LIMIT_IDLE))
        flow = self.flow
        silent = flow is not None and not (flow.bytes_in or flow.bytes_out)
        if limits.first_byte_timeout and silent:
            options.append((limits.first_byte_timeout, Refusal.LIMIT_FIRST_BYTE))
        return min(options) if options else None

    def arm_quiet_timer(self) -> None:
        """(Re)start the first-byte or idle timer for the current phase."""
        limit = self._quiet_limit()
        self.setTimeout(limit[0] if limit is not None else None)

    def timeoutConnection(self) -> None:  # noqa: N802
        """The SNI read's deadline passed, or the connection was quiet too long."""
        stats = self.factory.stats
        if self.state is RelayState.PREFIX:
            stats.refuse(Refusal.SNI_TIMEOUT)
            log.debug(
                "{peer} on {group}: no complete ClientHello within {t}s; closed",
                peer=self._peer(),
                group=self._group(),
                t=self.factory.limits.sni_timeout,
            )
            self.give_up(abort=True)
            return
        limit = self._quiet_limit()
        if limit is None or self.state not in _RELAYING:
            return
        seconds, reason = limit
        stats.refuse(reason)
        log.info(
            "{peer} on {group}: {what} for {idle}s; closed",
            peer=self._peer(),
            group=self._group(),
            what="no byte either way" if reason is Refusal.LIMIT_FIRST_BYTE else "idle",
            idle=seconds,
        )
        self.give_up()

    # -- ending -------------------------------------------------------------

    def _refuse(self, reason: Refusal, why: str, warn: bool = False) -> None:
        self.factory.stats.refuse(reason)
        (log.warn if warn else log.info)(
            "{peer} on {group} refused: {why}",
            peer=self._peer(),
            group=self._group(),
            why=why,
        )
        self.give_up()

    def relay_closed(self, reason: Failure) -> None:
        """Release the slot and the counters; one summary line if relayed."""
        self.setTimeout(None)
        self._sni = None
        self.replay = None
        if self.meter is not None:
            self.meter.close()
        factory = self.factory
        stats = factory.stats
        if factory.admission.release(self):
            stats.open -= 1
        flow, tunnel = self.flow, self.tunnel
        if flow is None or tunnel is None:
            return
        stats.flow_closed(flow)
        if factory.limits.log_connections:
            self._log_summary(flow, tunnel, reason)

    def _log_summary(self, flow: Flow, tunnel: Tunnel, reason: Failure) -> None:
        # Formatted here, once: the same fields as Logger.info would carry,
        # at about half its cost (emit_line).
        peer, group = self._peer(), self._group()
        glob, service = tunnel.hostname_glob, tunnel.backend_service
        client, bytes_in, bytes_out = flow.client_id, flow.bytes_in, flow.bytes_out
        duration = self.clock.seconds() - self.started
        end = "closed" if reason.check(ConnectionDone) else "reset"
        emit_line(
            log,
            LogLevel.info,
            f"{peer} on {group} {glob} via {client}/{service}: {bytes_in} bytes in,"
            f" {bytes_out} out, {duration:.3f}s, {end}",
            peer=peer,
            group=group,
            glob=glob,
            client=client,
            service=service,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration=duration,
            end=end,
        )

    def _peer(self) -> str:
        peer = self.transport.getPeer()
        if isinstance(peer, IPv4Address | IPv6Address):
            return format_address(peer.host, peer.port)
        return str(peer)

    def _group(self) -> str:
        return format_address(*self.factory.key)


class FrontendFactory(Factory):
    """Builds the connections of one tunnel group.

    ``clients`` chooses a tunnel's client (the serving table).
    ``admission`` is shared by every group of a gateway (sources count
    across sockets); without one the factory counts on its own.
    """

    protocol = PublicConnection

    def __init__(
        self,
        key: GroupKey,
        routes: RouteTable,
        clients: TunnelClients,
        clock: IReactorTime,
        stats: GatewayStats,
        limits: FrontendLimits = FrontendLimits(),
        admission: PublicAdmission | None = None,
    ) -> None:
        self.key = key
        self.routes = routes
        self.clients = clients
        self.clock = clock
        self.stats = stats
        self.limits = limits
        if admission is None:
            admission = PublicAdmission(
                limits.max_per_tunnel, limits.max_per_ip, limits.ipv6_prefix
            )
        self.admission = admission

    def startFactory(self) -> None:  # noqa: N802
        """The group's socket is listening."""
        self.stats.listening_sockets += 1

    def stopFactory(self) -> None:  # noqa: N802
        """The group's socket is closed."""
        self.stats.listening_sockets -= 1

    def buildProtocol(self, addr: object) -> PublicConnection:  # noqa: N802
        """A new user connection."""
        return PublicConnection(self)


def public_admission(limits: FrontendLimits) -> PublicAdmission:
    """The per-tunnel and per-source counts one gateway's sockets share."""
    return PublicAdmission(limits.max_per_tunnel, limits.max_per_ip, limits.ipv6_prefix)
