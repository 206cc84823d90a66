"""What the tunnel client's sessions share: its settings and its counters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IReactorTime,
        IReactorUDP,
        IStreamClientEndpoint,
    )

    from threshold.client.health import HealthMonitor
    from threshold.mux.settings import SessionConfig


@dataclass
class ClientStats:
    """The client's counters, updated where each event happens."""

    #: Streams reset because their header named no service of the map.
    unknown_service: int = 0
    #: Streams reset because their local service could not be connected.
    local_failures: int = 0
    #: SOCKS connections the gateway connected out (docs/egress.md).
    egress_connections: int = 0
    #: SOCKS connections refused or failed (locally or by the gateway).
    egress_refused: int = 0
    #: UDP flows served (each with its own local socket).
    udp_flows: int = 0
    #: UDP datagrams dropped, by reason (client/udp.py's ``UdpDrop``).
    udp_dropped: Counter[str] = field(default_factory=Counter)


@dataclass
class ClientSettings:
    """The tunnel client's settings, shared by its sessions to every gateway.

    What is per gateway is in :class:`~threshold.client.gateway.GatewayLink`.
    ``services`` is replaced as a whole by the admin API (``PUT
    /liveconfig``); each new stream looks its service up in the map in
    force when its header arrives.
    """

    client_id: str
    #: ``ServiceToLocalAddrMap``: service name to (host, port).
    services: dict[str, tuple[str, int]]
    clock: IReactorTime
    #: Makes the endpoint for a local service's (host, port).
    local_endpoint: Callable[[str, int], IStreamClientEndpoint]
    session_config: SessionConfig
    #: Seconds to wait for the server's answer to the hello.
    hello_timeout: float
    stats: ClientStats = field(default_factory=ClientStats)
    #: The health checks every session reports; None: no ``HealthChecks``.
    health: HealthMonitor | None = None
    #: Opens UDP flows' local sockets; None: the global reactor.
    udp_reactor: IReactorUDP | None = None

    def replace_services(self, services: dict[str, tuple[str, int]]) -> None:
        """Swap the service map in (live config); the checks follow it."""
        self.services = dict(services)
        if self.health is not None:
            self.health.services_changed(self.services)

    def __post_init__(self) -> None:
        self.services = dict(self.services)
