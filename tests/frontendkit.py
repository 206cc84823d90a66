"""An in-memory gateway front end for logic tests: Clock, StringTransport, iosim.

A :class:`Gateway` holds a route table, the gateway's counters and one
client session joined in memory to a tunnel client's session (the client
side serves each stream with ``accept``), so a test can connect users,
move time and see exactly what reached the client and what was left open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from threshold.server.frontend import (
    FrontendFactory,
    FrontendLimits,
    PublicConnection,
    public_admission,
)
from threshold.server.routes import RouteTable, parse_tunnels
from threshold.server.stats import GatewayStats
from threshold.testing import Collector, connected_sessions


def entry(port: int = 9000, glob: str = "*", service: str = "web", **more: Any):
    """One PUT /tunnels entry for client "c" on 127.0.0.1."""
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


class Gateway:
    """Route table, counters and one connected client, all in memory."""

    def __init__(
        self,
        entries: list[dict[str, Any]],
        limits: FrontendLimits | None = None,
        accept: Callable[[Any], Any] = lambda stream: Service(),
    ) -> None:
        self.clock = Clock()
        self.limits = limits or FrontendLimits()
        self.accepted: list[Any] = []

        def on_client(stream: Any) -> Any:
            protocol = accept(stream)
            self.accepted.append(protocol)
            return protocol

        self.client, self.session, self.pump = connected_sessions(
            accept_on_client=on_client, clock=self.clock
        )
        self.connected = True
        self.routes = RouteTable(
            lambda host, port, factory: succeed(object()),
            lambda key: None,
            lambda client_id: True,
        )
        result = self.routes.apply(parse_tunnels(entries))
        assert result.called
        self.stats = GatewayStats()
        self.admission = public_admission(self.limits)
        self.factories: dict[tuple[str, int], FrontendFactory] = {}

    def factory(self, key: tuple[str, int]) -> FrontendFactory:
        if key not in self.factories:
            self.factories[key] = FrontendFactory(
                key,
                self.routes,
                lambda client_id: self.session if self.connected else None,
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
        """A user connects (and sends ``sent``); the pump runs."""
        user = self.factory((address, port)).buildProtocol(None)
        transport = UserTransport(peer, port)
        transport.protocol = user
        user.makeConnection(transport)
        if sent and not transport.ended:
            user.dataReceived(sent)
        self.pump.flush()
        return user

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump.flush()
