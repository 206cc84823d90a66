"""The client registry: which tunnel clients are connected, and every state seen.

One :class:`ClientRecord` per ClientId ever accepted. A client's state
moves only through :meth:`ClientRegistry.connected`, :meth:`closing` and
:meth:`disconnected`, along :data:`TRANSITIONS`. The front end finds a
client's session here; the API and the metrics read the records.

Each record also holds the health its client last reported on the control
channel (:meth:`ClientRegistry.health_reported`), per service; it is
forgotten when the session ends. :meth:`ClientRegistry.health_for` says
whether a client can take a tunnel's connections now, and why not.
Whoever derives state from the records (the serving table) subscribes
with :meth:`ClientRegistry.subscribe` and is told the ClientId at every
change.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger

from threshold.logs import observer as log_observer
from threshold.wire.frames import GO_AWAY_NORMAL

if TYPE_CHECKING:
    from threshold.mux.session import MuxSession
    from threshold.wire.control import Health

__all__ = [
    "GOING_AWAY",
    "NOT_CONNECTED",
    "STATE_CLOSED",
    "STATE_CONNECTED",
    "STATE_ERROR",
    "STATE_UNKNOWN",
    "TRANSITIONS",
    "ClientChange",
    "ClientHealth",
    "ClientNotice",
    "user_streams",
    "ClientRecord",
    "ClientRegistry",
    "ClientState",
]

log = Logger(observer=log_observer)


class ClientState(enum.StrEnum):
    """A client's state as the API shows it (the values are the API's)."""

    UNKNOWN = "ClientUnknown"
    CONNECTED = "ClientConnected"
    CLOSED = "ClientClosed"
    ERROR = "ClientError"


#: The moves a client's state may make. A connected client connects again
#: when a newer connection replaces its session.
TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    ClientState.UNKNOWN: frozenset({ClientState.CONNECTED}),
    ClientState.CONNECTED: frozenset(
        {ClientState.CONNECTED, ClientState.CLOSED, ClientState.ERROR}
    ),
    ClientState.CLOSED: frozenset({ClientState.CONNECTED}),
    ClientState.ERROR: frozenset({ClientState.CONNECTED}),
}

STATE_UNKNOWN = ClientState.UNKNOWN
STATE_CONNECTED = ClientState.CONNECTED
STATE_CLOSED = ClientState.CLOSED
STATE_ERROR = ClientState.ERROR

#: The client's control channel: the stream its hello came on.
CONTROL_STREAM = 1

#: Why a client takes no connection (the ``Reason`` of GET /tunnels/status).
NOT_CONNECTED = "not connected"
GOING_AWAY = "going away"


def unhealthy(service: str, detail: str | None) -> str:
    """The reason for a service the client reported unhealthy."""
    if detail:
        return f"service {service} unhealthy: {detail}"
    return f"service {service} unhealthy"


class ClientChange(enum.StrEnum):
    """What a :class:`ClientNotice` tells (the event feed's client events)."""

    CONNECTED = "connected"
    #: A new session of a connected client replaced its older one.
    REPLACED = "replaced"
    DISCONNECTED = "disconnected"
    #: One service's reported health flipped.
    HEALTH = "health"


@dataclass(frozen=True, slots=True)
class ClientNotice:
    """One change of a client, for :meth:`ClientRegistry.watch` listeners.

    ``details``: the old peer (replaced), or the service, its health and
    the client's words (health).
    """

    change: ClientChange
    record: ClientRecord
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClientHealth:
    """Whether one client can take one tunnel's new connections, and why not.

    ``reason`` is the API's (:data:`NOT_CONNECTED`, :data:`GOING_AWAY`,
    :func:`unhealthy`); ``why`` says more for the log (how the session
    ended).
    """

    client_id: str
    connected: bool
    healthy: bool
    reason: str | None = None
    why: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The API view: ClientId, Connected, Healthy, Reason."""
        return {
            "ClientId": self.client_id,
            "Connected": self.connected,
            "Healthy": self.healthy,
            "Reason": self.reason,
        }


@dataclass
class ClientRecord:
    """What the server knows of one ClientId."""

    client_id: str
    current_state: ClientState = ClientState.UNKNOWN
    last_state: ClientState = ClientState.UNKNOWN
    session: MuxSession | None = None
    peer: str | None = None
    connected_since: float | None = None
    last_change: float | None = None
    last_error: str | None = None
    connections: int = 0
    #: The session that said Go Away, while its streams drain.
    draining: MuxSession | None = None
    #: Health the current session last reported: service -> healthy.
    health: dict[str, bool] = field(default_factory=dict)
    #: The reported detail of each unhealthy service.
    health_detail: dict[str, str] = field(default_factory=dict)
    health_reported: float | None = None
    #: Closes the current session with Go Away when a newer one replaces it.
    retire: Callable[[], None] | None = None
    #: When the current session's TLS certificate ends (None without TLS).
    certificate_not_after: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The API view of this client."""
        session = self.session
        return {
            "CurrentState": self.current_state.value,
            "LastState": self.last_state.value,
            "Peer": self.peer,
            "ConnectedSince": _iso(self.connected_since),
            "LastChange": _iso(self.last_change),
            "LastError": self.last_error,
            "Connections": self.connections,
            "OpenStreams": user_streams(session),
            "RttMilliseconds": (
                round(session.rtt * 1000, 3)
                if session is not None and session.rtt is not None
                else None
            ),
            "GoingAway": self.draining is not None,
            "Health": {
                service: {"Healthy": ok, "Detail": self.health_detail.get(service)}
                for service, ok in sorted(self.health.items())
            },
            "HealthReported": _iso(self.health_reported),
            "CertificateNotAfter": _iso(self.certificate_not_after),
        }


def user_streams(session: MuxSession | None) -> int:
    """Streams open for users on a client's session (the control stream,
    stream 1, is not one)."""
    if session is None:
        return 0
    streams = session.streams
    return len(streams) - (1 if CONTROL_STREAM in streams else 0)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class ClientRegistry:
    """Connected clients and the states of all clients seen."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._records: dict[str, ClientRecord] = {}
        self._now = wall_clock
        self._listeners: list[Callable[[str], None]] = []
        self._watchers: list[Callable[[ClientNotice], None]] = []

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(client_id)`` after every change of a client's
        session or health (connected, closing, ended, health reported)."""
        self._listeners.append(listener)

    def watch(self, watcher: Callable[[ClientNotice], None]) -> None:
        """Call ``watcher(notice)`` at each client connected, replaced or
        disconnected and each service whose reported health flipped."""
        self._watchers.append(watcher)

    def _notify(
        self, change: ClientChange, record: ClientRecord, **details: Any
    ) -> None:
        for watcher in self._watchers:
            watcher(ClientNotice(change, record, details))

    def _changed(self, client_id: str) -> None:
        for listener in self._listeners:
            listener(client_id)

    def record(self, client_id: str) -> ClientRecord | None:
        """The record of one client, if it was ever accepted."""
        return self._records.get(client_id)

    def health_for(self, client_id: str, service: str) -> ClientHealth:
        """Whether the client can take new connections for ``service`` now.

        Healthy: its session is up (hello accepted, no Go Away) and it has
        not reported ``service`` unhealthy (a service it does not check is
        healthy while the session is up).
        """
        record = self._records.get(client_id)
        if record is None or record.session is None:
            if record is not None and record.draining is not None:
                return ClientHealth(client_id, False, False, GOING_AWAY, GOING_AWAY)
            why = NOT_CONNECTED
            if record is not None and record.current_state is ClientState.CLOSED:
                why = "session closed"
            elif record is not None and record.current_state is ClientState.ERROR:
                why = f"session lost: {record.last_error}"
            return ClientHealth(client_id, False, False, NOT_CONNECTED, why)
        if record.health.get(service, True):
            return ClientHealth(client_id, True, True)
        reason = unhealthy(service, record.health_detail.get(service))
        return ClientHealth(client_id, True, False, reason, reason)

    def health_reported(
        self, client_id: str, session: MuxSession, health: Health
    ) -> bool:
        """A client's session reported the full health of what it checks.

        Only the current session speaks for the client; True when this
        changed what is known.
        """
        record = self._records.get(client_id)
        if record is None or record.session is not session:
            return False
        record.health_reported = self._now()
        states, detail = dict(health.states), dict(health.detail)
        if states == record.health and detail == record.health_detail:
            return False
        flipped = []
        for service, ok in sorted(states.items()):
            if record.health.get(service, True) != ok:
                flipped.append((service, ok))
                log.info(
                    "client {client_id}: service {service} {state}{detail}",
                    client_id=client_id,
                    service=service,
                    state="healthy" if ok else "unhealthy",
                    detail=f" ({detail[service]})" if service in detail else "",
                )
        record.health, record.health_detail = states, detail
        for service, ok in flipped:
            self._notify(
                ClientChange.HEALTH,
                record,
                service=service,
                healthy=ok,
                detail=detail.get(service),
            )
        self._changed(client_id)
        return True

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every client seen, for ``GET /clients``."""
        return {cid: r.to_json() for cid, r in sorted(self._records.items())}

    def records(self) -> list[ClientRecord]:
        """Every client seen (for metrics)."""
        return list(self._records.values())

    def is_connected(self, client_id: str) -> bool:
        """Whether the client has an accepted session now."""
        record = self._records.get(client_id)
        return record is not None and record.session is not None

    def session_for(self, client_id: str) -> MuxSession | None:
        """The client's current session, if connected."""
        record = self._records.get(client_id)
        return record.session if record is not None else None

    def connected_count(self) -> int:
        """How many clients are connected now."""
        return sum(1 for r in self._records.values() if r.session is not None)

    def connected(
        self,
        client_id: str,
        session: MuxSession,
        peer: str,
        retire: Callable[[], None] | None = None,
        certificate_not_after: float | None = None,
    ) -> None:
        """A hello was accepted; an older session of the same id is replaced.

        ``retire()`` ends this session with Go Away if a newer one replaces
        it (default: ``session.go_away()``). The new session starts with no
        health reported: every service healthy until it says otherwise.
        """
        record = self._records.setdefault(client_id, ClientRecord(client_id))
        old, old_retire, old_peer = record.session, record.retire, record.peer
        record.session = session
        record.certificate_not_after = certificate_not_after
        record.retire = retire
        record.peer = peer
        record.connected_since = self._now()
        record.connections += 1
        record.last_error = None
        record.draining = None
        self._forget_health(record)
        self._move(record, ClientState.CONNECTED)
        if old is not None and old is not session:
            log.info(
                "client {client_id}: new connection from {peer} replaces the older one",
                client_id=client_id,
                peer=peer,
            )
            if old_retire is not None:
                old_retire()
            else:
                old.go_away(GO_AWAY_NORMAL)
            self._notify(ClientChange.REPLACED, record, old_peer=old_peer)
        else:
            self._notify(ClientChange.CONNECTED, record)
        self._changed(client_id)

    def closing(self, client_id: str, session: MuxSession) -> None:
        """The client said Go Away: it is closed now, whatever still drains.

        Its streams may finish, but it takes no new one, so it is no longer
        connected for the front end; it is "going away" until the session
        ends.
        """
        record = self._records.get(client_id)
        if record is not None and record.session is session:
            record.draining = session
        self._end(client_id, session, ClientState.CLOSED, None)

    def disconnected(
        self, client_id: str, session: MuxSession, reason: BaseException
    ) -> None:
        """A session ended; only the current one changes the state.

        A clean end (the transport closed, or the peer's Go Away) is
        ``ClientClosed``; anything else (reset, keepalive timeout, protocol
        error) is ``ClientError`` with the reason.
        """
        if isinstance(reason, ConnectionDone):
            self._end(client_id, session, ClientState.CLOSED, None)
        else:
            why = str(reason) or type(reason).__name__
            self._end(client_id, session, ClientState.ERROR, why)

    def _end(
        self,
        client_id: str,
        session: MuxSession,
        state: ClientState,
        error: str | None,
    ) -> None:
        record = self._records.get(client_id)
        draining = record is not None and record.draining is session
        if draining and record.session is not session:
            # The session that said Go Away has drained.
            record.draining = None
            self._changed(client_id)
            return
        # A replaced or already-closed session no longer speaks for the client.
        if record is None or record.session is not session:
            return
        record.session = None
        record.retire = None
        record.connected_since = None
        record.certificate_not_after = None
        if error is not None:
            record.last_error = error
        self._forget_health(record)
        self._move(record, state)
        self._notify(ClientChange.DISCONNECTED, record)
        self._changed(client_id)

    @staticmethod
    def _forget_health(record: ClientRecord) -> None:
        record.health = {}
        record.health_detail = {}
        record.health_reported = None

    def _move(self, record: ClientRecord, state: ClientState) -> None:
        if state not in TRANSITIONS[record.current_state]:
            raise AssertionError(
                f"client {record.client_id}: no move {record.current_state} -> {state}"
            )
        record.last_state = record.current_state
        record.current_state = state
        record.last_change = self._now()
        log.info(
            "client {client_id}: {last} -> {state}{error}",
            client_id=record.client_id,
            last=record.last_state.value,
            state=state.value,
            error=f" ({record.last_error})" if record.last_error else "",
        )
