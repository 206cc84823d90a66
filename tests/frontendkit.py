"""An in-memory gateway front end for logic tests: Clock, StringTransport, iosim.

A :class:`Gateway` holds a route table, the gateway's counters, a client
registry with its serving table, and client sessions joined in memory to
tunnel clients' sessions (each client side serves its streams with
``accept``), so a test can connect users, move time, end sessions, report
health and see exactly what reached each client and what was left open.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.server.frontend import (
    FrontendFactory,
    FrontendLimits,
    PublicConnection,
    public_admission,
)
from threshold.server.registry import ClientRegistry
from threshold.server.routes import RouteTable, parse_tunnels
from threshold.server.serving import ServingTable
from threshold.server.stats import GatewayStats
from threshold.testing import Collector
from threshold.wire.control import Health


def entry(port: int = 9000, glob: str = "*", service: str = "web", **more: Any):
    """One PUT /tunnels entry for client "c" on 127.0.0.1 (ClientIds: more)."""
    if "ClientIds" in more:
        return {
            "ListenAddress": "127.0.0.1",
            "ListenPort": port,
            "ListenHostnameGlob": glob,
            "BackEndService": service,
            **more,
        }
    return {
        "ClientId": "c",
        "ListenAddress": "127.0.0.1",
        "ListenPort": port,
        "ListenHostnameGlob": glob,
        "BackEndService": service,
        **more,
    }


class Service(Collector):
    """The tunnel client's end of a stream: records, and closes on EOF."""

    def readConnectionLost(self) -> None:  # noqa: N802
        super().readConnectionLost()
        self.transport.loseConnection()


class UserTransport(StringTransport):
    """A user's TCP connection: ends (connectionLost) when closed or aborted."""

    def __init__(self, peer: tuple[str, int], port: int) -> None:
        host, peer_port = peer
        kind = IPv6Address if ":" in host else IPv4Address
        super().__init__(
            hostAddress=kind("TCP", "::" if ":" in host else "127.0.0.1", port),
            peerAddress=kind("TCP", host, peer_port),
        )
        self.ended = False

    def loseConnection(self) -> None:  # noqa: N802
        super().loseConnection()
        self._end(Failure(ConnectionDone()))

    def abortConnection(self) -> None:  # noqa: N802
        super().abortConnection()
        self._end(Failure(ConnectionAborted()))

    def _end(self, reason: Failure) -> None:
        if not self.ended:
            self.ended = True
            self.protocol.connectionLost(reason)


class _Reporting(StreamAcceptor):
    """The gateway side's handler: tells the registry how the session ends."""

    def __init__(self, registry: ClientRegistry, client_id: str) -> None:
        super().__init__(lambda stream: None)
        self.registry = registry
        self.client_id = client_id

    def go_away_received(self, session: MuxSession, code: int) -> None:
        self.registry.closing(self.client_id, session)

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        self.registry.disconnected(self.client_id, session, reason)


class ClientSide:
    """One tunnel client joined in memory: its session, the gateway's, a pump.

    The gateway's session reports its Go Away and its end to ``registry``,
    as the control connection does.
    """

    def __init__(
        self,
        client_id: str,
        clock: Clock,
        accept: Callable[[Any], Any],
        registry: ClientRegistry,
    ) -> None:
        self.client_id = client_id
        self.accepted: list[Any] = []

        def on_client(stream: Any) -> Any:
            protocol = accept(stream)
            if protocol is not None:
                self.accepted.append(protocol)
            return protocol

        quiet = SessionConfig(keepalive_interval=0)
        self.client, self.session, self.pump = iosim.connectedServerAndClient(
            lambda: MuxSession(
                client=False,
                clock=clock,
                handler=_Reporting(registry, client_id),
                config=quiet,
                name=f"gateway side of {client_id}",
            ),
            lambda: MuxSession(
                client=True,
                clock=clock,
                handler=StreamAcceptor(on_client),
                config=quiet,
                name=f"client {client_id}",
            ),
            clock=clock,
        )


class Refusing(Collector):
    """A client whose local service refuses: it resets every stream."""

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.abortConnection()


class Gateway:
    """Route table, counters, registry, serving table and connected clients.

    ``clients`` are connected in memory at start (client ``"c"`` by
    default, the one the ``client``, ``session``, ``pump`` and ``accepted``
    attributes are about); ``accept`` serves their streams.
    """

    def __init__(
        self,
        entries: list[dict[str, Any]],
        limits: FrontendLimits | None = None,
        accept: Callable[[Any], Any] = lambda stream: Service(),
        clients: Sequence[str] = ("c",),
    ) -> None:
        self.clock = Clock()
        self.limits = limits or FrontendLimits()
        self.registry = ClientRegistry(wall_clock=self.clock.seconds)
        self.stats = GatewayStats()
        self.serving = ServingTable(self.registry, self.stats)
        self.sides: dict[str, ClientSide] = {}
        for client_id in clients:
            self.add_client(client_id, accept)
        self.routes = RouteTable(
            lambda host, port, factory: succeed(object()),
            lambda key: None,
            self.serving.update,
        )
        result = self.routes.apply(parse_tunnels(entries))
        assert result.called
        self.admission = public_admission(self.limits)
        self.factories: dict[tuple[str, int], FrontendFactory] = {}

    def add_client(
        self, client_id: str, accept: Callable[[Any], Any] = lambda s: Service()
    ) -> ClientSide:
        """Connect a tunnel client (again: a new session replaces the old)."""
        side = ClientSide(client_id, self.clock, accept, self.registry)
        self.sides[client_id] = side
        self.registry.connected(client_id, side.session, f"{client_id}:1")
        return side

    def disconnect(self, client_id: str) -> None:
        """The client's connection closes (a clean TCP close, no Go Away)."""
        side = self.sides[client_id]
        side.client.transport.loseConnection()
        self.flush()

    def report(self, client_id: str, **states: bool) -> None:
        """The client reports the health of its services."""
        side = self.sides[client_id]
        self.registry.health_reported(client_id, side.session, Health(states))

    @property
    def first(self) -> ClientSide:
        return next(iter(self.sides.values()))

    @property
    def client(self) -> Any:
        return self.first.client

    @property
    def session(self) -> Any:
        return self.first.session

    @property
    def pump(self) -> Any:
        return self.first.pump

    @property
    def accepted(self) -> list[Any]:
        return self.first.accepted

    def flush(self) -> None:
        for side in self.sides.values():
            side.pump.flush()

    def factory(self, key: tuple[str, int]) -> FrontendFactory:
        if key not in self.factories:
            self.factories[key] = FrontendFactory(
                key,
                self.routes,
                self.serving,
                self.clock,
                self.stats,
                self.limits,
                self.admission,
            )
        return self.factories[key]

    def connect(
        self,
        port: int = 9000,
        peer: tuple[str, int] = ("203.0.113.9", 51000),
        sent: bytes = b"",
        address: str = "127.0.0.1",
    ) -> PublicConnection:
        """A user connects (and sends ``sent``); the pumps run."""
        user = self.factory((address, port)).buildProtocol(None)
        transport = UserTransport(peer, port)
        transport.protocol = user
        user.makeConnection(transport)
        if sent and not transport.ended:
            user.dataReceived(sent)
        self.flush()
        return user

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()
