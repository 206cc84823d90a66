"""The public listeners: accept internet users and relay them into streams.

One :class:`FrontendFactory` per tunnel group ``(ListenAddress,
ListenPort)``. At each accepted connection it looks the group's entries up
in the route table (so a ``PUT /tunnels`` that moves a tunnel affects the
next connection, never a running one):

- a group whose only entry is ``*`` forwards at once, reading nothing, so
  protocols where the server speaks first work;
- otherwise the TLS ClientHello is read (bounded in size and time), the
  SNI name picks the entry, and the bytes read are replayed unchanged.

The stream to the client starts with the service header, then the PROXY
header when the tunnel asks for it, then the user's bytes, all written
without waiting for the client's ACK: no round trip is added.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.logs import observer as log_observer
from threshold.mux.session import SessionClosed, StreamLimitReached
from threshold.relay import RelayEnd, tune_transport
from threshold.server.routes import (
    GroupKey,
    Tunnel,
    format_address,
    needs_sni,
    select_route,
)
from threshold.wire import clienthello, proxyheader
from threshold.wire.handshake import encode_stream_header

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from threshold.mux.session import MuxSession
    from threshold.server.routes import RouteTable

log = Logger(observer=log_observer)


@dataclass(slots=True)
class Traffic:
    """Connections and bytes of one tunnel or one client."""

    accepted: int = 0
    open: int = 0
    #: Bytes from internet users to the service.
    bytes_in: int = 0
    #: Bytes from the service to internet users.
    bytes_out: int = 0


TunnelKey = tuple[str, int, str]


class FrontendStats:
    """Counters the front end keeps, for the API, logs and metrics.

    Byte counts are exact: every chunk relayed is added as it passes.
    """

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.refused_no_route = 0
        self.refused_no_client = 0
        self.refused_limit: Counter[str] = Counter()
        self.sni_timeouts = 0
        self.sni_not_tls = 0
        self.tunnels: dict[TunnelKey, Traffic] = {}
        self.clients: dict[str, Traffic] = {}
        self.per_ip: dict[str, int] = {}

    def tunnel(self, tunnel: Tunnel) -> Traffic:
        """The counters of one tunnel (address, port, hostname glob)."""
        key = (tunnel.listen_address, tunnel.listen_port, tunnel.hostname_glob)
        traffic = self.tunnels.get(key)
        if traffic is None:
            traffic = self.tunnels[key] = Traffic()
        return traffic

    def client(self, client_id: str) -> Traffic:
        """The counters of one client, over all its tunnels."""
        traffic = self.clients.get(client_id)
        if traffic is None:
            traffic = self.clients[client_id] = Traffic()
        return traffic


@dataclass(frozen=True)
class FrontendLimits:
    """Bounds on what internet users can hold."""

    sni_timeout: float = 10.0
    max_hello: int = clienthello.DEFAULT_MAX_SIZE
    #: Concurrent connections on one tunnel socket; 0: no limit.
    max_per_tunnel: int = 10000
    #: Concurrent connections from one source IP, all tunnels; 0: no limit.
    max_per_ip: int = 256
    #: Close connections idle this long; 0: never.
    idle_timeout: float = 0.0


class _ServiceSide(RelayEnd):
    """The stream end of a public connection: counts bytes to the user."""

    def __init__(self, public: PublicConnection) -> None:
        super().__init__()
        self.public = public

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        public = self.public
        size = len(data)
        public.bytes_out += size
        public.tunnel_traffic.bytes_out += size
        public.client_traffic.bytes_out += size
        public.last_activity = public.clock.seconds()
        super().dataReceived(data)


class PublicConnection(RelayEnd):
    """An internet user's connection on a tunnel port."""

    _timeout: IDelayedCall | None = None
    _idle_call: IDelayedCall | None = None
    tunnel: Tunnel | None = None
    tunnel_traffic: Traffic
    client_traffic: Traffic
    bytes_out = 0
    last_activity = 0.0

    def __init__(self, factory: FrontendFactory) -> None:
        super().__init__(on_close=self._closed)
        self.factory = factory
        self.clock = factory.clock
        self._hello = b""
        self._routed = False
        self._counted = False
        self._ip: str | None = None

    def connectionMade(self) -> None:  # noqa: N802
        """Check the limits, then route at once or read the ClientHello."""
        factory = self.factory
        stats = factory.stats
        limits = factory.limits
        stats.accepted += 1
        self.started = self.clock.seconds()
        peer = self.transport.getPeer()
        ip = getattr(peer, "host", None)
        if limits.max_per_tunnel and factory.open >= limits.max_per_tunnel:
            self._refuse_limit(
                "tunnel", f"{factory.open} connections on this tunnel already"
            )
            return
        if ip is not None and limits.max_per_ip:
            if stats.per_ip.get(ip, 0) >= limits.max_per_ip:
                self._refuse_limit(
                    "source_ip", f"{stats.per_ip[ip]} connections from {ip} already"
                )
                return
        self._counted = True
        stats.open += 1
        factory.open += 1
        if ip is not None:
            self._ip = ip
            stats.per_ip[ip] = stats.per_ip.get(ip, 0) + 1
        tune_transport(self.transport)
        entries = factory.routes.group(factory.key)
        if not entries:
            self._refuse("no tunnel on this address any more")
            return
        if not needs_sni(entries):
            self._route(entries[0], b"")
            return
        self._timeout = self.clock.callLater(limits.sni_timeout, self._sni_timed_out)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Before routing, collect the ClientHello; after, relay."""
        if self._routed:
            size = len(data)
            self.tunnel_traffic.bytes_in += size
            self.client_traffic.bytes_in += size
            self.last_activity = self.clock.seconds()
            super().dataReceived(data)
            return
        self._hello += data
        result = clienthello.parse_client_hello(
            self._hello, self.factory.limits.max_hello
        )
        if isinstance(result, clienthello.NeedMore):
            return
        self._cancel_timeout()
        entries = self.factory.routes.group(self.factory.key)
        if isinstance(result, clienthello.NotTls):
            self.factory.stats.sni_not_tls += 1
            log.debug(
                "{peer} on {group}: not a TLS ClientHello: {why}",
                peer=self._peer(),
                group=self._group(),
                why=result.reason,
            )
            name = None
        else:
            name = result.server_name
        route = select_route(entries, name)
        if route is None:
            self._refuse(f"no tunnel for server name {name!r}")
            return
        hello, self._hello = self._hello, b""
        self._route(route, hello)

    def readConnectionLost(self) -> None:  # noqa: N802
        """EOF before routing ends the connection; after, it half-closes."""
        if not self._routed:
            self.transport.loseConnection()
            return
        super().readConnectionLost()

    def _route(self, tunnel: Tunnel, first_bytes: bytes) -> None:
        factory = self.factory
        session = factory.session_for(tunnel.client_id)
        if session is None:
            self._refuse(
                f'client "{tunnel.client_id}" is not connected', no_client=True
            )
            return
        stream_end = _ServiceSide(self)
        try:
            stream = session.open_stream(stream_end)
        except StreamLimitReached as e:
            factory.limit_hit("streams_per_session")
            self._refuse(str(e), no_client=True)
            return
        except SessionClosed as e:
            self._refuse(str(e), no_client=True)
            return
        self._routed = True
        self.tunnel = tunnel
        stats = factory.stats
        self.tunnel_traffic = stats.tunnel(tunnel)
        self.client_traffic = stats.client(tunnel.client_id)
        for traffic in (self.tunnel_traffic, self.client_traffic):
            traffic.accepted += 1
            traffic.open += 1
        self.bytes_in = len(first_bytes)
        self.tunnel_traffic.bytes_in += len(first_bytes)
        self.client_traffic.bytes_in += len(first_bytes)
        self.last_activity = self.clock.seconds()
        if factory.limits.idle_timeout:
            self._idle_call = self.clock.callLater(
                factory.limits.idle_timeout, self._idle_check
            )
        # Header, PROXY header and the bytes read so far go out as one Data
        # frame, right behind the SYN: the client needs no round trip.
        opening = [encode_stream_header(tunnel.backend_service)]
        if tunnel.proxy_protocol:
            opening.append(
                proxyheader.build(
                    tunnel.proxy_protocol_version,
                    self.transport.getPeer(),
                    self.transport.getHost(),
                )
            )
        opening.append(first_bytes)
        stream.writeSequence(opening)
        self.join(stream_end)
        log.debug(
            "{peer} on {group} -> client {client} service {service} (stream "
            "{stream_id})",
            peer=self._peer(),
            group=self._group(),
            client=tunnel.client_id,
            service=tunnel.backend_service,
            stream_id=stream.id,
        )

    def _idle_check(self) -> None:
        self._idle_call = None
        idle = self.factory.limits.idle_timeout
        quiet = self.clock.seconds() - self.last_activity
        if quiet < idle:
            self._idle_call = self.clock.callLater(idle - quiet, self._idle_check)
            return
        self.factory.stats.refused_limit["idle"] += 1
        log.info(
            "{peer} on {group}: idle for {idle}s; closed",
            peer=self._peer(),
            group=self._group(),
            idle=idle,
        )
        self.transport.loseConnection()

    def _sni_timed_out(self) -> None:
        self._timeout = None
        self.factory.stats.sni_timeouts += 1
        log.debug(
            "{peer} on {group}: no complete ClientHello within {t}s; closed",
            peer=self._peer(),
            group=self._group(),
            t=self.factory.limits.sni_timeout,
        )
        self.transport.abortConnection()

    def _refuse(self, why: str, no_client: bool = False) -> None:
        # Each refusal is counted once, as a missing route or a missing client.
        if no_client:
            self.factory.stats.refused_no_client += 1
        else:
            self.factory.stats.refused_no_route += 1
        log.info(
            "{peer} on {group} refused: {why}",
            peer=self._peer(),
            group=self._group(),
            why=why,
        )
        self.transport.loseConnection()

    def _refuse_limit(self, which: str, why: str) -> None:
        self.factory.stats.refused_limit[which] += 1
        self.factory.limit_hit(f"connections_per_{which}")
        log.warn(
            "{peer} on {group} refused: {why} (limit)",
            peer=self._peer(),
            group=self._group(),
            why=why,
        )
        self.transport.abortConnection()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _closed(self, reason: Failure) -> None:
        self._cancel_timeout()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if not self._counted:
            return
        self._counted = False
        factory = self.factory
        stats = factory.stats
        stats.open -= 1
        factory.open -= 1
        if self._ip is not None:
            left = stats.per_ip[self._ip] - 1
            if left:
                stats.per_ip[self._ip] = left
            else:
                del stats.per_ip[self._ip]
        tunnel = self.tunnel
        if tunnel is None:
            return
        self.tunnel_traffic.open -= 1
        self.client_traffic.open -= 1
        log.info(
            "{peer} on {group} {glob} via {client}/{service}: {bytes_in} bytes in, "
            "{bytes_out} out, {duration:.3f}s, {end}",
            peer=self._peer(),
            group=self._group(),
            glob=tunnel.hostname_glob,
            client=tunnel.client_id,
            service=tunnel.backend_service,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration=self.clock.seconds() - self.started,
            end="closed" if reason.check(ConnectionDone) else "reset",
        )

    def _peer(self) -> str:
        peer = self.transport.getPeer()
        if isinstance(peer, IPv4Address | IPv6Address):
            return format_address(peer.host, peer.port)
        return str(peer)

    def _group(self) -> str:
        return format_address(*self.factory.key)


class FrontendFactory(Factory):
    """Builds the connections of one tunnel group."""

    protocol = PublicConnection

    def __init__(
        self,
        key: GroupKey,
        routes: RouteTable,
        session_for: Callable[[str], MuxSession | None],
        clock: IReactorTime,
        stats: FrontendStats,
        limits: FrontendLimits = FrontendLimits(),
        limit_hit: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.key = key
        self.routes = routes
        self.session_for = session_for
        self.clock = clock
        self.stats = stats
        self.limits = limits
        self.limit_hit = limit_hit
        #: Connections open on this socket now.
        self.open = 0

    def buildProtocol(self, addr: object) -> PublicConnection:  # noqa: N802
        """A new user connection."""
        return PublicConnection(self)
