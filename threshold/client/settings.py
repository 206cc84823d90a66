"""What the tunnel client's sessions share: its settings and its counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from threshold.mux.settings import SessionConfig


@dataclass
class ClientStats:
    """The client's counters, updated where each event happens."""

    #: Streams reset because their header named no service of the map.
    unknown_service: int = 0
    #: Streams reset because their local service could not be connected.
    local_failures: int = 0
    #: Hellos refused (or unanswered) in a row; an accepted one resets it.
    #: The reconnect backoff grows with it.
    consecutive_refusals: int = 0


@dataclass
class ClientSettings:
    """The tunnel client's settings, shared by each session it makes.

    ``services`` is replaced as a whole by the admin API (``PUT
    /liveconfig``); each new stream looks its service up in the map in
    force when its header arrives.
    """

    client_id: str
    #: ``ServiceToLocalAddrMap``: service name to (host, port).
    services: dict[str, tuple[str, int]]
    #: The server as ``host:port``, for log lines.
    server: str
    clock: IReactorTime
    #: Makes the endpoint for a local service's (host, port).
    local_endpoint: Callable[[str, int], IStreamClientEndpoint]
    session_config: SessionConfig
    #: Seconds to wait for the server's answer to the hello.
    hello_timeout: float
    stats: ClientStats = field(default_factory=ClientStats)

    def __post_init__(self) -> None:
        self.services = dict(self.services)
