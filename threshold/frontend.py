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

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold import clienthello, proxyheader
from threshold.handshake import encode_stream_header
from threshold.logs import observer as log_observer
from threshold.mux.session import SessionClosed, StreamLimitReached
from threshold.relay import RelayEnd
from threshold.routes import GroupKey, Tunnel, format_address, needs_sni, select_route

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from threshold.mux.session import MuxSession
    from threshold.routes import RouteTable

log = Logger(observer=log_observer)


class FrontendStats:
    """Counters the front end keeps (read by the API and metrics)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.refused_no_route = 0
        self.refused_no_client = 0
        self.sni_timeouts = 0
        self.sni_not_tls = 0
        self.open = 0


class PublicConnection(RelayEnd):
    """An internet user's connection on a tunnel port."""

    _timeout: IDelayedCall | None = None
    _stream_end: RelayEnd | None = None

    def __init__(self, factory: FrontendFactory) -> None:
        super().__init__(on_close=self._closed)
        self.factory = factory
        self._hello = b""
        self._routed = False
        self._counted = False

    def connectionMade(self) -> None:  # noqa: N802
        """Route at once, or start reading the ClientHello."""
        factory = self.factory
        factory.stats.accepted += 1
        factory.stats.open += 1
        self._counted = True
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        entries = factory.routes.group(factory.key)
        if not entries:
            self._refuse("no tunnel on this address any more")
            return
        if not needs_sni(entries):
            self._route(entries[0], b"")
            return
        self._timeout = factory.clock.callLater(
            factory.sni_timeout, self._sni_timed_out
        )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Before routing, collect the ClientHello; after, relay."""
        if self._routed:
            super().dataReceived(data)
            return
        self._hello += data
        result = clienthello.parse_client_hello(self._hello, self.factory.max_hello)
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
        stream_end = RelayEnd()
        try:
            stream = session.open_stream(stream_end)
        except (SessionClosed, StreamLimitReached) as e:
            self._refuse(str(e), no_client=True)
            return
        self._routed = True
        self.tunnel = tunnel
        stream.write(encode_stream_header(tunnel.backend_service))
        if tunnel.proxy_protocol:
            stream.write(
                proxyheader.build(
                    tunnel.proxy_protocol_version,
                    self.transport.getPeer(),
                    self.transport.getHost(),
                )
            )
        if first_bytes:
            stream.write(first_bytes)
        self.join(stream_end)
        self._stream_end = stream_end
        log.debug(
            "{peer} on {group} -> client {client} service {service} (stream "
            "{stream_id})",
            peer=self._peer(),
            group=self._group(),
            client=tunnel.client_id,
            service=tunnel.backend_service,
            stream_id=stream.id,
        )

    def _sni_timed_out(self) -> None:
        self._timeout = None
        self.factory.stats.sni_timeouts += 1
        log.debug(
            "{peer} on {group}: no complete ClientHello within {t}s; closed",
            peer=self._peer(),
            group=self._group(),
            t=self.factory.sni_timeout,
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

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _closed(self, reason: Failure) -> None:
        self._cancel_timeout()
        if self._counted:
            self._counted = False
            self.factory.stats.open -= 1

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
        sni_timeout: float = 10.0,
        max_hello: int = clienthello.DEFAULT_MAX_SIZE,
    ) -> None:
        self.key = key
        self.routes = routes
        self.session_for = session_for
        self.clock = clock
        self.stats = stats
        self.sni_timeout = sni_timeout
        self.max_hello = max_hello

    def buildProtocol(self, addr: object) -> PublicConnection:  # noqa: N802
        """A new user connection."""
        return PublicConnection(self)
