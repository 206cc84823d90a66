"""The client registry: which tunnel clients are connected, and every state seen.

One :class:`ClientRecord` per ClientId ever accepted. A client's state
moves only through :meth:`ClientRegistry.connected`, :meth:`closing` and
:meth:`disconnected`, along :data:`TRANSITIONS`. The front end finds a
client's session here; the API and the metrics read the records.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger

from threshold.logs import observer as log_observer
from threshold.wire.frames import GO_AWAY_NORMAL

if TYPE_CHECKING:
    from threshold.mux.session import MuxSession

__all__ = [
    "STATE_CLOSED",
    "STATE_CONNECTED",
    "STATE_ERROR",
    "STATE_UNKNOWN",
    "TRANSITIONS",
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
            "OpenStreams": len(session.streams) if session is not None else 0,
            "RttMilliseconds": (
                round(session.rtt * 1000, 3)
                if session is not None and session.rtt is not None
                else None
            ),
        }


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class ClientRegistry:
    """Connected clients and the states of all clients seen."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._records: dict[str, ClientRecord] = {}
        self._now = wall_clock

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

    def connected(self, client_id: str, session: MuxSession, peer: str) -> None:
        """A hello was accepted; an older session of the same id is replaced."""
        record = self._records.setdefault(client_id, ClientRecord(client_id))
        old = record.session
        record.session = session
        record.peer = peer
        record.connected_since = self._now()
        record.connections += 1
        record.last_error = None
        self._move(record, ClientState.CONNECTED)
        if old is not None and old is not session:
            log.info(
                "client {client_id}: new connection from {peer} replaces the older one",
                client_id=client_id,
                peer=peer,
            )
            old.go_away(GO_AWAY_NORMAL)

    def closing(self, client_id: str, session: MuxSession) -> None:
        """The client said Go Away: it is closed now, whatever still drains.

        Its streams may finish, but it takes no new one, so it is no longer
        connected for the front end or ``PUT /tunnels``.
        """
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
        # A replaced or already-closed session no longer speaks for the client.
        if record is None or record.session is not session:
            return
        record.session = None
        record.connected_since = None
        if error is not None:
            record.last_error = error
        self._move(record, state)

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
