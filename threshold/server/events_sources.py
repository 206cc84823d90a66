"""Where the events come from: the registry, serving table, route table, counters.

:class:`EventSources` listens to each part of the gateway once and turns
what it reports into feed events (docs/events.md has every type and its
fields). :class:`ExpiryWatch` checks certificates' end dates, at each
client's hello and every :data:`CHECK_INTERVAL` seconds, and announces
each certificate ending within 30 days at most once a day.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.task import LoopingCall

from threshold.server.certinfo import EXPIRY_WARNING_DAYS, CertificateInfo, iso
from threshold.server.events import EventFeed, EventType
from threshold.server.registry import ClientChange, ClientNotice, ClientState
from threshold.server.tunnels import format_address

if TYPE_CHECKING:
    from threshold.server.registry import ClientRegistry
    from threshold.server.routes import RouteTable
    from threshold.server.serving import ServingTable
    from threshold.server.stats import GatewayStats, Limit
    from threshold.server.tunnels import Tunnel, TunnelKey

__all__ = ["CHECK_INTERVAL", "EventSources", "ExpiryWatch", "tunnel_json"]

#: Seconds between two checks of every certificate's end date.
CHECK_INTERVAL = 3600.0
#: A certificate is announced at most this often (seconds).
ANNOUNCE_INTERVAL = 86400.0


def tunnel_json(tunnel: Tunnel) -> dict[str, Any]:
    """A tunnel in events: where it listens and what it reaches."""
    return {
        "ListenAddress": tunnel.listen_address,
        "ListenPort": tunnel.listen_port,
        "ListenHostnameGlob": tunnel.hostname_glob,
        "BackEndService": tunnel.backend_service,
    }


def _key_text(key: TunnelKey | tuple[str, int]) -> str:
    """A tunnel key (or a group's address and port) in events."""
    address, port = key[0], key[1]
    glob = key[2] if len(key) > 2 else "*"
    text = format_address(address, port)
    return text if glob == "*" else f"{text} {glob}"


#: ``limit_hit(limit, tunnel=..., client=..., source=...)`` -> event fields.
_WHERE = {"tunnel": "Tunnel", "client": "ClientId", "source": "Source"}


class ExpiryWatch:
    """Announces certificates that end within EXPIRY_WARNING_DAYS days."""

    def __init__(self, feed: EventFeed, wall_clock: Callable[[], float]) -> None:
        self.feed = feed
        self.wall_clock = wall_clock
        #: (subject kind, ClientId) -> (notAfter announced, when).
        self._announced: dict[tuple[str, str | None], tuple[float, float]] = {}

    def check(
        self, kind: str, client_id: str | None, not_after: float | None, dn: str = ""
    ) -> bool:
        """Announce one certificate if it ends soon and was not announced
        today (a renewed one, with another end date, is announced anew)."""
        if not_after is None:
            return False
        now = self.wall_clock()
        days = (not_after - now) / 86400.0
        if days > EXPIRY_WARNING_DAYS:
            return False
        key = (kind, client_id)
        last = self._announced.get(key)
        if last is not None and last[0] == not_after:
            if now - last[1] < ANNOUNCE_INTERVAL:
                return False
        self._announced[key] = (not_after, now)
        fields: dict[str, Any] = {"Certificate": kind}
        if client_id is not None:
            fields["ClientId"] = client_id
        if dn:
            fields["Subject"] = dn
        self.feed.emit(
            EventType.CERTIFICATE_EXPIRING,
            **fields,
            NotAfter=iso(not_after),
            DaysLeft=round(days, 1),
            Expired=days <= 0,
        )
        return True

    def forget(self, client_id: str) -> None:
        """A client left: its certificate is checked afresh at its next hello."""
        self._announced.pop(("client", client_id), None)


class EventSources:
    """Feeds the events of one gateway's parts into ``feed``."""

    def __init__(
        self,
        feed: EventFeed,
        registry: ClientRegistry,
        serving: ServingTable,
        routes: RouteTable,
        stats: GatewayStats,
        server_certificate: CertificateInfo | None = None,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.feed = feed
        self.registry = registry
        self.server_certificate = server_certificate
        self.expiry = ExpiryWatch(feed, feed.wall_clock)
        self._previous: list[Tunnel] = list(routes.tunnels())
        registry.watch(self._client)
        serving.on_failover = self._failover
        routes.watch(self._switched)
        stats.on_limit = self._limit
        feed.limits.render = _limit_fields
        self._checks = LoopingCall(self.check_certificates)
        self._checks.clock = feed.clock
        self._interval = check_interval

    def start(self) -> None:
        """Check the certificates now and every ``check_interval``."""
        if not self._checks.running:
            self._checks.start(self._interval, now=True)

    def stop(self) -> None:
        """Stop the periodic checks."""
        if self._checks.running:
            self._checks.stop()

    def check_certificates(self) -> None:
        """The server's certificate, and each connected client's."""
        cert = self.server_certificate
        if cert is not None:
            self.expiry.check("server", None, cert.not_after, cert.subject)
        for record in self.registry.records():
            if record.session is not None:
                self.expiry.check(
                    "client", record.client_id, record.certificate_not_after
                )

    # -- what each part reports --------------------------------------------------

    def _client(self, notice: ClientNotice) -> None:
        record = notice.record
        client_id = record.client_id
        if notice.change is ClientChange.CONNECTED:
            self.feed.emit(
                EventType.CLIENT_CONNECTED,
                ClientId=client_id,
                Peer=record.peer,
                Connections=record.connections,
                CertificateNotAfter=iso(record.certificate_not_after),
            )
            self.expiry.check("client", client_id, record.certificate_not_after)
        elif notice.change is ClientChange.REPLACED:
            self.feed.emit(
                EventType.CLIENT_REPLACED,
                ClientId=client_id,
                Peer=record.peer,
                OldPeer=notice.details.get("old_peer"),
                Connections=record.connections,
                CertificateNotAfter=iso(record.certificate_not_after),
            )
            self.expiry.check("client", client_id, record.certificate_not_after)
        elif notice.change is ClientChange.DISCONNECTED:
            error = record.current_state is ClientState.ERROR
            self.feed.emit(
                EventType.CLIENT_DISCONNECTED,
                ClientId=client_id,
                Peer=record.peer,
                State=record.current_state.value,
                Error=record.last_error if error else None,
            )
            self.expiry.forget(client_id)
        elif notice.change is ClientChange.HEALTH:
            self.feed.emit(
                EventType.CLIENT_HEALTH,
                ClientId=client_id,
                Service=notice.details["service"],
                Healthy=notice.details["healthy"],
                Detail=notice.details.get("detail"),
            )

    def _failover(
        self, tunnel: Tunnel, was: str, serving: tuple[str, ...], why: str
    ) -> None:
        self.feed.emit(
            EventType.TUNNEL_FAILOVER,
            Tunnel=tunnel_json(tunnel),
            From=was,
            To=serving[0] if serving else None,
            Serving=list(serving),
            Reason=why,
        )

    def _switched(self, tunnels: list[Tunnel], revision: int) -> None:
        before = {t.key: t for t in self._previous}
        after = {t.key: t for t in tunnels}
        self._previous = list(tunnels)
        self.feed.emit(
            EventType.TUNNELS_APPLIED,
            Revision=revision,
            Tunnels=len(tunnels),
            Groups=len({t.group for t in tunnels}),
            Added=sum(1 for k in after if k not in before),
            Removed=sum(1 for k in before if k not in after),
            Changed=sum(1 for k, t in after.items() if k in before and before[k] != t),
        )

    def _limit(self, limit: Limit, where: dict[str, object]) -> None:
        self.feed.limits.hit(limit.value, where)


def _limit_fields(where: dict[str, Any]) -> dict[str, Any]:
    """A limit hit's ``where`` (tunnel key, client, source) as event fields."""
    fields: dict[str, Any] = {}
    for name, value in where.items():
        if name == "tunnel" and isinstance(value, tuple):
            value = _key_text(value)
        fields[_WHERE.get(name, name)] = value
    return fields
