"""``GET /server``: the gateway's own facts, for tools and the status page.

Its id in a fleet, the version running, when it started, where it
listens, and when its TLS certificate ends (``CertificateNotAfter``, which
``threshold-ctl doctor`` warns about).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from threshold.server.certinfo import CertificateInfo, iso

if TYPE_CHECKING:
    from threshold.server.events import EventFeed

__all__ = ["ServerFacts", "version"]


def version() -> str:
    """The installed threshold's version ("unknown" when not installed)."""
    try:
        return metadata.version("threshold")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class ServerFacts:
    """What ``GET /server`` answers: fixed at start, plus live counts."""

    #: The TunnelServer (its routes and registry).
    server: Any
    gateway_id: str | None
    use_tls: bool
    listen_address: str
    tunnel_control_port: int
    management_port: int | None
    certificate: CertificateInfo | None = None
    feed: EventFeed | None = None
    started: float = 0.0
    wall_clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.wall_clock()

    def to_json(self) -> dict[str, Any]:
        """The answer of ``GET /server``."""
        cert = self.certificate
        feed = self.feed
        return {
            "GatewayId": self.gateway_id,
            "Version": version(),
            "StartedAt": iso(self.started),
            "UptimeSeconds": round(self.wall_clock() - self.started, 3),
            "UseTls": self.use_tls,
            "ListenAddress": self.listen_address,
            "TunnelControlPort": self.tunnel_control_port,
            "ManagementPort": self.management_port,
            "CertificateNotAfter": cert.not_after_iso if cert is not None else None,
            "CertificateSubject": cert.subject if cert is not None else None,
            "TunnelRevision": self.server.routes.revision,
            "TunnelsInForce": len(self.server.routes.tunnels()),
            "ClientsConnected": self.server.registry.connected_count(),
            "LastEventId": feed.last_id if feed is not None else None,
            "OldestEventId": feed.oldest_id if feed is not None else None,
        }
