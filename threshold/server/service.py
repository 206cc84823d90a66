"""The tunnel server: control connections, the client registry, tunnels.

Each tunnel client holds one control connection, a yamux session. The
client opens stream 1 and says hello; until the hello is accepted the
server opens no stream and accepts no other. With TLS the hello's clientId
must match the certificate's Common Name (``ClientId`` or
``ClientId@Domain``). A client whose id is already connected replaces the
older connection: a half-dead old session never locks a client out.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    inlineCallbacks,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.logs import observer as log_observer
from threshold.mux.session import (
    GoAwayReceived,
    KeepaliveTimeout,
    MuxSession,
    ProtocolViolation,
    SessionConfig,
)
from threshold.relay import tune_transport
from threshold.server.frontend import FrontendFactory, FrontendLimits, FrontendStats
from threshold.server.routes import RouteTable, TunnelError, parse_tunnels
from threshold.tls import peer_common_name
from threshold.wire import strictjson
from threshold.wire.frames import GO_AWAY_NORMAL
from threshold.wire.handshake import (
    HandshakeError,
    LineBuffer,
    encode_hello_reply,
    parse_hello,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IDelayedCall,
        IListeningPort,
        IProtocolFactory,
        IReactorTime,
    )

    from threshold.mux.stream import Stream
    from threshold.server.routes import GroupKey, Tunnel

log = Logger(observer=log_observer)

STATE_UNKNOWN = "ClientUnknown"
STATE_CONNECTED = "ClientConnected"
STATE_CLOSED = "ClientClosed"
STATE_ERROR = "ClientError"


@dataclass
class ClientRecord:
    """What the server knows of one ClientId."""

    client_id: str
    current_state: str = STATE_UNKNOWN
    last_state: str = STATE_UNKNOWN
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
            "CurrentState": self.current_state,
            "LastState": self.last_state,
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

    def sessions(self) -> list[MuxSession]:
        """All current sessions."""
        return [r.session for r in self._records.values() if r.session is not None]

    def connected(self, client_id: str, session: MuxSession, peer: str) -> None:
        """A hello was accepted; an older session of the same id is replaced."""
        record = self._records.setdefault(client_id, ClientRecord(client_id))
        old = record.session
        record.session = session
        record.peer = peer
        record.connected_since = self._now()
        record.connections += 1
        record.last_error = None
        self._set_state(record, STATE_CONNECTED)
        if old is not None and old is not session:
            log.info(
                "client {client_id}: new connection from {peer} replaces the older one",
                client_id=client_id,
                peer=peer,
            )
            old.go_away(GO_AWAY_NORMAL)

    def disconnected(
        self, client_id: str, session: MuxSession, reason: BaseException
    ) -> None:
        """A session ended; only the current one changes the state."""
        record = self._records.get(client_id)
        if record is None or record.session is not session:
            return
        record.session = None
        record.connected_since = None
        if isinstance(reason, ConnectionDone | GoAwayReceived) and not isinstance(
            reason, KeepaliveTimeout
        ):
            self._set_state(record, STATE_CLOSED)
        else:
            record.last_error = str(reason) or type(reason).__name__
            self._set_state(record, STATE_ERROR)

    def _set_state(self, record: ClientRecord, state: str) -> None:
        record.last_state = record.current_state
        record.current_state = state
        record.last_change = self._now()
        log.info(
            "client {client_id}: {last} -> {state}{error}",
            client_id=record.client_id,
            last=record.last_state,
            state=state,
            error=f" ({record.last_error})" if record.last_error else "",
        )


@dataclass(frozen=True)
class ControlSettings:
    """What the control listener needs from the server config."""

    use_tls: bool = False
    domain: str | None = None
    handshake_timeout: float = 10.0
    max_clients: int = 1000
    max_pending_handshakes: int = 100
    session: SessionConfig = SessionConfig()


class HelloProtocol(Protocol):
    """Stream 1 on the server: read the hello, answer it."""

    def __init__(self, control: ControlConnection) -> None:
        self.control = control
        self.buffer = LineBuffer()
        self.done = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Collect one line, then let the control connection judge it."""
        if self.done:
            return
        try:
            line, _rest = self.buffer.feed(data)
        except HandshakeError as e:
            self.done = True
            self.control.hello_failed(str(e), "bad_hello")
            return
        if line is None:
            return
        self.done = True
        self.control.hello_received(line)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # noqa: N802
        """The client closed stream 1 before a hello: fail the handshake."""
        if not self.done:
            self.done = True
            self.control.hello_failed("stream 1 closed before the hello", "closed")


class ControlConnection:
    """The server side of one client's control connection."""

    def __init__(self, server: TunnelServer, session_factory: ControlFactory) -> None:
        self.server = server
        self.settings = session_factory.settings
        self.clock = session_factory.clock
        self.client_id: str | None = None
        self.accepted = False
        self.hello_stream: Stream | None = None
        self._timeout: IDelayedCall | None = None
        self.peer = "?"
        self.session = MuxSession(
            client=False,
            clock=self.clock,
            handler=self,
            config=self.settings.session,
            name="control connection",
        )

    def session_started(self, session: MuxSession) -> None:
        """The transport is up: start the handshake clock."""
        transport = self.session.transport
        tune_transport(transport)
        self.peer = _describe(transport.getPeer())
        self.session.name = f"control connection from {self.peer}"
        self._timeout = self.clock.callLater(
            self.settings.handshake_timeout, self._handshake_timed_out
        )

    def stream_opened(self, session: MuxSession, stream: Stream) -> Protocol | None:
        """Only stream 1, only before the hello; the rest is reserved."""
        if not self.accepted and self.hello_stream is None and stream.id == 1:
            self.hello_stream = stream
            return HelloProtocol(self)
        log.debug(
            "{name}: stream {stream_id} refused (not a tunnel stream)",
            name=self.session.name,
            stream_id=stream.id,
        )
        return None

    def hello_received(self, line: bytes) -> None:
        """Check a hello; accept the client or refuse with a reason."""
        try:
            hello = parse_hello(line)
        except HandshakeError as e:
            self.hello_failed(str(e), "bad_hello")
            return
        if self.settings.use_tls:
            expected = hello.client_id
            if self.settings.domain:
                expected = f"{hello.client_id}@{self.settings.domain}"
            name = peer_common_name(self.session.transport)
            if name != expected:
                self.hello_failed(
                    f'clientId "{hello.client_id}" does not match the '
                    f'certificate (CN "{name}", expected "{expected}")',
                    "identity",
                )
                return
        registry = self.server.registry
        if (
            not registry.is_connected(hello.client_id)
            and registry.connected_count() >= self.settings.max_clients
        ):
            self.hello_failed(
                f"server full: {self.settings.max_clients} clients connected",
                "server_full",
            )
            return
        self._cancel_timeout()
        self.accepted = True
        self.client_id = hello.client_id
        self.session.name = f"client {hello.client_id} ({self.peer})"
        registry.connected(hello.client_id, self.session, self.peer)
        assert self.hello_stream is not None
        self.hello_stream.write(encode_hello_reply(True))
        self.hello_stream.loseConnection()

    def hello_failed(self, why: str, reason: str) -> None:
        """Refuse the client: answer with ``why``, then Go Away.

        ``reason`` is the failure's kind for metrics: bad_hello, identity,
        server_full, timeout, closed.
        """
        self._cancel_timeout()
        self.server.handshake_failures += 1
        self.server.handshake_failure_reasons[reason] += 1
        log.warn("{name}: handshake refused: {why}", name=self.session.name, why=why)
        if self.hello_stream is not None and not self.hello_stream.closed:
            self.hello_stream.write(encode_hello_reply(False, why))
            self.hello_stream.loseWriteConnection()
        self.session.close(GO_AWAY_NORMAL)

    def _handshake_timed_out(self) -> None:
        self._timeout = None
        if not self.accepted:
            self.hello_failed(
                f"no hello within {self.settings.handshake_timeout}s", "timeout"
            )

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        """Forget the connection; a connected client becomes closed."""
        self._cancel_timeout()
        self.server.control_connections.discard(self)
        if self.accepted and self.client_id is not None:
            self.server.registry.disconnected(self.client_id, self.session, reason)
        log.info(
            "{name}: control connection closed: {why}",
            name=self.session.name,
            why=_why(reason),
        )


def _why(reason: BaseException) -> str:
    if isinstance(reason, ProtocolViolation):
        return f"protocol error: {reason}"
    return str(reason) or type(reason).__name__


def _describe(address: object) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ControlFactory(Factory):
    """Builds a session per accepted control connection."""

    def __init__(
        self, server: TunnelServer, settings: ControlSettings, clock: IReactorTime
    ) -> None:
        self.server = server
        self.settings = settings
        self.clock = clock

    def buildProtocol(self, addr: object) -> MuxSession | None:  # noqa: N802
        """One control connection; refused when too many are pending."""
        server = self.server
        pending = sum(1 for c in server.control_connections if not c.accepted)
        if pending >= self.settings.max_pending_handshakes:
            server.limit_hit("pending_handshakes")
            log.warn(
                "control connection from {peer} refused: {count} handshakes "
                "pending (MaxPendingHandshakes)",
                peer=_describe(addr),
                count=pending,
            )
            return None
        control = ControlConnection(server, self)
        server.control_connections.add(control)
        return control.session


class TunnelServer(Service):
    """The server's state: registry, route table, front end, state file.

    ``listen(host, port, factory)`` opens a public socket (an endpoint's
    ``listen``). With a ``state_file``, every accepted tunnel set is written
    atomically and restored at start, listening before clients return.
    """

    def __init__(
        self,
        listen: Callable[[str, int, IProtocolFactory], Deferred[IListeningPort]],
        clock: IReactorTime,
        settings: ControlSettings = ControlSettings(),
        state_file: str | None = None,
        restore: list[Tunnel] | None = None,
        limits: FrontendLimits | None = None,
        shutdown_grace: float = 10.0,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.state_file = state_file
        self._restore = restore or []
        self.registry = ClientRegistry()
        self.stats = FrontendStats()
        self.handshake_failures = 0
        self.handshake_failure_reasons: Counter[str] = Counter()
        #: How often each limit was hit, by name.
        self.limits_hit: Counter[str] = Counter()
        self.shutdown_grace = shutdown_grace
        self.control_connections: set[ControlConnection] = set()
        self.limits = limits or FrontendLimits()
        self.routes = RouteTable(listen, self._make_factory, self.registry.is_connected)

    def _make_factory(self, key: GroupKey) -> FrontendFactory:
        return FrontendFactory(
            key,
            self.routes,
            self.registry.session_for,
            self.clock,
            self.stats,
            self.limits,
            self.limit_hit,
        )

    def limit_hit(self, name: str) -> None:
        """Count one hit of a limit (exported as a metric)."""
        self.limits_hit[name] += 1

    def control_factory(self) -> ControlFactory:
        """The factory for the tunnel control listener."""
        return ControlFactory(self, self.settings, self.clock)

    def apply(self, tunnels: list[Tunnel]) -> Deferred[list[Tunnel]]:
        """Apply a new tunnel set (all or nothing), then persist it."""
        d = self.routes.apply(tunnels)
        d.addCallback(self._persist)
        return d

    def _persist(self, tunnels: list[Tunnel]) -> list[Tunnel]:
        if self.state_file is not None:
            write_state(self.state_file, tunnels)
        return tunnels

    @inlineCallbacks
    def startService(self):  # noqa: N802, ANN201
        """Restore the persisted tunnels, listening before clients return."""
        Service.startService(self)
        tunnels, self._restore = self._restore, []
        if not tunnels:
            return
        try:
            yield self.routes.apply(tunnels, check_clients=False)
        except TunnelError as e:
            log.error(
                "state file {path}: cannot restore the tunnels: {why}",
                path=self.state_file,
                why=e.message,
            )
            return
        log.info(
            "state file {path}: {count} tunnels restored",
            path=self.state_file,
            count=len(tunnels),
        )

    @inlineCallbacks
    def stopService(self):  # noqa: N802, ANN201
        """Stop gracefully: listeners first, then a grace period, then close.

        The public sockets close so no new connection arrives; every client
        gets Go Away (no new streams; the session closes when its last stream
        ends); connections still running after ``shutdown_grace`` seconds
        are cut.
        """
        Service.stopService(self)
        yield self.routes.close()
        sessions = [c.session for c in self.control_connections]
        closed = [s.when_closed() for s in sessions]
        for session in sessions:
            session.go_away(GO_AWAY_NORMAL)
        running = sum(len(s.streams) for s in sessions)
        if running:
            log.info(
                "stopping: {count} connections may finish within {grace}s",
                count=running,
                grace=self.shutdown_grace,
            )
        done = DeferredList(closed, consumeErrors=True)
        # Cancelling the list at the deadline fires it (with the waits it
        # cancelled marked as failures), so what is still open is checked.
        timer = self.clock.callLater(self.shutdown_grace, done.cancel)
        yield done
        if timer.active():
            timer.cancel()
        left = [s for s in sessions if not s.closed]
        if left:
            log.warn(
                "stopping: grace period over, {count} connections cut",
                count=sum(len(s.streams) for s in left),
            )
            for session in left:
                session.close()


class StateFileError(Exception):
    """The state file cannot be read or is not a tunnel list."""


def write_state(path: str, tunnels: list[Tunnel]) -> None:
    """Write the tunnel set atomically: temporary file, fsync, rename."""
    body = json.dumps([t.to_json() for t in tunnels], indent=2).encode() + b"\n"
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state(path: str) -> list[Tunnel]:
    """Read a state file written by :func:`write_state`."""
    try:
        with open(path, "rb") as f:
            body = strictjson.loads(f.read())
        return parse_tunnels(body)
    except OSError as e:
        raise StateFileError(f"{path}: cannot read: {e.strerror}") from None
    except strictjson.JsonError as e:
        raise StateFileError(f"{path}: not valid JSON: {e}") from None
    except TunnelError as e:
        raise StateFileError(f"{path}: {e.message}") from None
