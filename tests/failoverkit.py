"""Failover on real processes: gateways, clients, tagged backends, user loops.

Used by tests/test_failover_e2e.py and benchmarks/failover_bench.py.

- :class:`Gateway` and :class:`HomeClient` write a TLS config from the
  shared test PKI (tests.certs) and run it as a ``twistd`` subprocess
  (:class:`tests.faultkit.TwistdProcess`).
- :class:`TaggedBackend` answers each connection with its tag line, then
  echoes, so a user knows which home machine served it and checks every
  byte.
- :class:`UserLoop` keeps a number of users connecting one after another
  and records each one's start, end and :class:`Outcome`.
- :class:`Api` calls a gateway's management API over mutual TLS with a
  fresh connection per call (a gateway may be killed between two calls).
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from tests.certs import test_pki
from tests.faultkit import TwistdProcess, sleep
from tests.support import free_port
from threshold.tls import ClientCertPolicy

__all__ = [
    "Api",
    "Gateway",
    "HomeClient",
    "Outcome",
    "TaggedBackend",
    "UserLoop",
    "run_users",
    "wait_for",
]

#: Client ids with a certificate in the test PKI.
HOME_A = "TestClient1"
HOME_B = "TestClient2"


@inlineCallbacks
def wait_for(check: Any, timeout: float, what: str, interval: float = 0.02):
    """Call ``check()`` (a value or a Deferred) until it is truthy; return it.

    Exceptions count as "not yet" (a process still starting).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = yield check()
        except Exception as e:  # noqa: BLE001 - a process starting or gone
            value, last = None, e
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}: {last}"
            )
        yield sleep(interval)


# -- processes --------------------------------------------------------------------


class Gateway:
    """A ``threshold-server`` subprocess with TLS on free loopback ports."""

    def __init__(
        self,
        directory: str,
        name: str = "gateway",
        keepalive: tuple[float, float] = (1.0, 3.0),
        **more: Any,
    ) -> None:
        pki = test_pki()
        self.control_port = free_port()
        self.management_port = free_port()
        config = {
            "TunnelControlPort": self.control_port,
            "ManagementPort": self.management_port,
            "ListenAddress": "127.0.0.1",
            "ManagementListenAddress": "127.0.0.1",
            "UseTls": True,
            "CaCertificateFile": pki.ca_cert,
            "ServerTlsKeyFile": pki.server_key,
            "ServerTlsCertificateFile": pki.server_cert,
            "KeepaliveIntervalSeconds": keepalive[0],
            "KeepaliveTimeoutSeconds": keepalive[1],
            "StateFile": os.path.join(directory, f"{name}-state.json"),
        }
        config.update(more)
        self.process = TwistdProcess("threshold-server", config, directory, name)
        self.api = Api(self.management_port)

    def start(self) -> None:
        self.process.start()

    def wait_ready(self, timeout: float = 20.0) -> Deferred[Any]:
        """Until ``GET /ping`` answers ``pong``."""

        @inlineCallbacks
        def ping():
            if not self.process.running:
                raise AssertionError(f"gateway exited\n{self.process.log_tail()}")
            code, body = yield self.api.call("GET", "/ping", decode=False)
            return code == 200 and body == b"pong"

        return wait_for(ping, timeout, "the gateway to answer /ping", interval=0.05)

    def wait_client(self, client_id: str, timeout: float = 20.0) -> Deferred[Any]:
        """Until ``GET /clients`` shows ``client_id`` connected."""

        @inlineCallbacks
        def connected():
            code, clients = yield self.api.call("GET", "/clients")
            record = clients.get(client_id, {})
            return record.get("CurrentState") == "ClientConnected"

        return wait_for(connected, timeout, f"{client_id} to connect", interval=0.05)


class HomeClient:
    """A ``threshold-client`` subprocess: one home machine."""

    def __init__(
        self,
        directory: str,
        client_id: str,
        gateways: list[Gateway],
        services: dict[str, int],
        keepalive: tuple[float, float] = (1.0, 3.0),
        admin_socket: str | None = None,
        **more: Any,
    ) -> None:
        pki = test_pki()
        self.client_id = client_id
        #: A Unix socket's path is limited to about 100 bytes: pass a short one.
        self.admin_socket = admin_socket
        config = {
            "ClientId": client_id,
            "Servers": [
                {"Host": "127.0.0.1", "TunnelControlPort": g.control_port}
                for g in gateways
            ],
            "UseTls": True,
            "CaCertificateFile": pki.ca_cert,
            "ClientTlsKeyFile": pki.client_key(client_id),
            "ClientTlsCertificateFile": pki.client_cert(client_id),
            "ServiceToLocalAddrMap": {
                name: f"127.0.0.1:{port}" for name, port in services.items()
            },
            "KeepaliveIntervalSeconds": keepalive[0],
            "KeepaliveTimeoutSeconds": keepalive[1],
            "ReconnectInitialDelaySeconds": 0.05,
            "ReconnectMaxDelaySeconds": 0.5,
        }
        if admin_socket is not None:
            config["AdminSocket"] = admin_socket
        config.update(more)
        self.process = TwistdProcess("threshold-client", config, directory, client_id)

    def start(self) -> None:
        self.process.start()

    def status(self) -> dict[str, Any]:
        """``GET /status`` on the admin socket (blocking; a local Unix socket)."""
        assert self.admin_socket is not None
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2.0)
            s.connect(self.admin_socket)
            s.sendall(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise AssertionError(f"GET /status: {head!r}")
        return json.loads(body)


# -- the management API -----------------------------------------------------------


class Api:
    """A gateway's management API over mutual TLS (the operator certificate)."""

    def __init__(self, port: int) -> None:
        self.port = port
        pki = test_pki()
        self._policy = ClientCertPolicy(
            pki.ca_cert, pki.client_key("operator"), pki.client_cert("operator")
        )

    @inlineCallbacks
    def call(self, method: str, path: str, body: Any = None, decode: bool = True):
        """One call on a connection of its own; return (status, body)."""
        # Not persistent: a kept-open connection would outlive a killed gateway.
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, contextFactory=self._policy, pool=pool))
        url = f"https://localhost:{self.port}{path}"
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {"Content-Type": ["application/json"]}
        response = yield http.request(method, url, **kwargs)
        content = yield response.content()
        return response.code, (json.loads(content) if decode else content)

    @inlineCallbacks
    def put_tunnels(self, tunnels: list[dict[str, Any]]):
        code, body = yield self.call("PUT", "/tunnels", tunnels)
        if code != 200:
            raise AssertionError(f"PUT /tunnels: {code} {body}")
        return body

    @inlineCallbacks
    def status(self):
        """``GET /tunnels/status``'s tunnels."""
        code, body = yield self.call("GET", "/tunnels/status")
        assert code == 200, (code, body)
        return body["Tunnels"]

    @inlineCallbacks
    def serving(self):
        """The first tunnel's ``Serving`` list."""
        tunnels = yield self.status()
        return tunnels[0]["Serving"]

    @inlineCallbacks
    def metric(self, name: str, **labels: str):
        """The sum of a metric's samples whose labels include ``labels``."""
        code, text = yield self.call("GET", "/metrics", decode=False)
        assert code == 200, code
        total = 0.0
        for line in text.decode().splitlines():
            if not line.startswith(name):
                continue
            sample, _, value = line.rpartition(" ")
            metric, _, rest = sample.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += float(value)
        return total


def tunnel_entry(
    port: int, client_ids: list[str], balance: str = "failover", **more: Any
) -> dict[str, Any]:
    """One tunnel to ``web`` on 127.0.0.1:``port``."""
    entry: dict[str, Any] = {
        "ClientIds": client_ids,
        "ListenAddress": "127.0.0.1",
        "ListenPort": port,
        "BackEndService": "web",
        "Balance": balance,
    }
    entry.update(more)
    return entry


# -- backends and users ------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class _Tagged(Protocol):
    def __init__(self, backend: TaggedBackend) -> None:
        self.backend = backend

    def connectionMade(self) -> None:  # noqa: N802
        self.backend.accepted += 1
        self.backend.open.add(self)
        self.transport.write(self.backend.tag + b"\n")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.backend.open.discard(self)


class TaggedBackend:
    """A local service: its tag and a newline, then an echo until EOF."""

    def __init__(self, tag: str) -> None:
        self.tag = tag.encode()
        self.accepted = 0
        self.open: set[_Tagged] = set()
        self.port: Any = None
        self.number = 0

    @inlineCallbacks
    def start(self, number: int = 0):
        """Listen (on ``number`` again after a stop); return the port."""
        self.port = yield TCP4ServerEndpoint(
            reactor, number, interface="127.0.0.1"
        ).listen(Factory.forProtocol(lambda: _Tagged(self)))
        self.number = self.port.getHost().port
        return self.number

    def stop_listening(self) -> Deferred[Any]:
        """Refuse new connections (running ones finish)."""
        port, self.port = self.port, None
        return port.stopListening() if port is not None else sleep(0)

    def stop(self) -> Deferred[Any]:
        for connection in list(self.open):
            connection.transport.abortConnection()
        return self.stop_listening()


class Outcome(StrEnum):
    """What one user got."""

    #: Every byte back, after a tag.
    SERVED = "served"
    #: Closed with nothing received (the gateway refused, or a reset).
    REFUSED = "refused"
    #: Some bytes, but not all of them or not the right ones; or a TCP error.
    FAILED = "failed"


@dataclass
class UserRecord:
    start: float
    end: float = 0.0
    outcome: Outcome | None = None
    tag: str | None = None


@implementer(IHalfCloseableProtocol)
class _User(Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.chunks.append(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.done.callback(b"".join(self.chunks))


#: Longest a user waits for its whole answer.
USER_TIMEOUT = 10.0


@inlineCallbacks
def one_user(port: int, size: int, rng: random.Random):
    """One user: send ``size`` random bytes, half-close, check the answer."""
    record = UserRecord(start=time.monotonic())
    payload = rng.randbytes(size)
    user = _User(payload)
    try:
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), user)
    except Exception:  # noqa: BLE001 - counted, not raised
        record.outcome, record.end = Outcome.FAILED, time.monotonic()
        return record
    timer = reactor.callLater(USER_TIMEOUT, user.transport.abortConnection)
    data = yield user.done
    if timer.active():
        timer.cancel()
    record.end = time.monotonic()
    tag, newline, rest = data.partition(b"\n")
    if not data:
        record.outcome = Outcome.REFUSED
    elif newline and rest == payload:
        record.outcome, record.tag = Outcome.SERVED, tag.decode()
    else:
        record.outcome = Outcome.FAILED
    return record


@dataclass
class UserLoop:
    """``concurrency`` users at a time on ``port`` until stopped (or ``limit``)."""

    port: int
    concurrency: int = 4
    size: int = 2048
    limit: int = 20_000
    records: list[UserRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.port)
        self._stopping = False
        self._running = 0
        self._idle: Deferred[None] | None = None

    def start(self) -> None:
        for _ in range(self.concurrency):
            self._next()

    def _next(self) -> None:
        if self._stopping or len(self.records) >= self.limit:
            if self._running == 0 and self._idle is not None:
                idle, self._idle = self._idle, None
                idle.callback(None)
            return
        self._running += 1
        index = len(self.records)
        self.records.append(UserRecord(start=time.monotonic()))

        def done(record: UserRecord) -> None:
            self.records[index] = record
            self._running -= 1
            self._next()

        one_user(self.port, self.size, self._rng).addCallback(done)

    def stop(self) -> Deferred[None]:
        """Start no more users; fires when the running ones are done."""
        self._stopping = True
        self._idle = Deferred()
        if self._running == 0:
            idle, self._idle = self._idle, None
            idle.callback(None)
            return idle
        return self._idle

    # -- reading the records ----------------------------------------------------

    def count(self, outcome: Outcome, after: float = 0.0) -> int:
        return sum(1 for r in self.records if r.outcome is outcome and r.start >= after)

    def bad(self, after: float = 0.0) -> list[UserRecord]:
        """Users started at ``after`` or later that were not served."""
        return [
            r
            for r in self.records
            if r.start >= after and r.outcome is not Outcome.SERVED
        ]

    def served_by(self, tag: str, after: float = 0.0) -> list[UserRecord]:
        return [r for r in self.records if r.tag == tag and r.start >= after]

    def takeover(self, since: float, tag: str) -> float | None:
        """Seconds from ``since`` to the start of the first user served by
        ``tag`` after which no user failed or was refused; None if none."""
        bad = [r.start for r in self.bad(since)]
        last_bad = max(bad, default=since)
        first = [r.start for r in self.served_by(tag, last_bad)]
        return min(first) - since if first else None


@inlineCallbacks
def run_users(port: int, total: int, concurrency: int = 16, size: int = 256):
    """``total`` users, ``concurrency`` at a time; return the UserLoop."""
    loop = UserLoop(port, concurrency=concurrency, size=size, limit=total)
    loop._idle = Deferred()
    finished = loop._idle
    loop.start()
    yield finished
    return loop


@implementer(IHalfCloseableProtocol)
class _HeldUser(_User):
    """A user that keeps its connection open until told to half-close."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.echoed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        super().dataReceived(data)
        received = b"".join(self.chunks)
        if not self.echoed.called and received.endswith(self.payload):
            self.echoed.callback(None)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if not self.echoed.called:
            self.echoed.callback(None)
        super().connectionLost(reason)


@inlineCallbacks
def held_users(port: int, count: int, size: int = 64):
    """``count`` users open at once: each connects, sends ``size`` bytes and
    waits for its echo; once all have it, all half-close. Return each
    user's tag (None for one not served with every byte back).

    With every connection still open when the next arrives, the gateway's
    open-connection counts are exact at each choice (for least-connections).
    """
    rng = random.Random(count)
    users = []
    for _ in range(count):
        user = _HeldUser(rng.randbytes(size))
        users.append(user)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), user)
    timer = reactor.callLater(
        USER_TIMEOUT, lambda: [u.transport.abortConnection() for u in users]
    )
    for user in users:
        yield user.echoed
    for user in users:
        if user.transport.connected:
            user.transport.loseWriteConnection()
    tags = []
    for user in users:
        data = yield user.done
        tag, newline, rest = data.partition(b"\n")
        tags.append(tag.decode() if newline and rest == user.payload else None)
    if timer.active():
        timer.cancel()
    return tags
