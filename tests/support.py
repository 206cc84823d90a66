"""Real-socket fixtures: a server and client on loopback, backends, users."""

from __future__ import annotations

import json
import re
import socket
from dataclasses import replace
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from tests.certs import test_pki
from threshold.config import ClientConfig, ServerConfig
from threshold.tap.client import build_client
from threshold.tap.server import build_server
from threshold.tls import ClientCertPolicy


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@inlineCallbacks
def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` every 10 ms until true; fail after ``timeout``."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        yield deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """A backend or user connection that records and optionally echoes."""

    def __init__(self, echo: bool = False, greeting: bytes = b"") -> None:
        self.echo = echo
        self.greeting = greeting
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost: Any = None
        self.done: Deferred[Any] = Deferred()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def connectionMade(self) -> None:  # noqa: N802
        self.host = self.transport.getHost()
        self.peer = self.transport.getPeer()
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.chunks.append(data)
        if self.echo:
            self.transport.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.eof = True
        if self.echo:
            self.transport.loseWriteConnection()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.lost = reason
        if not self.done.called:
            self.done.callback(self)


class Backend:
    """A local service on loopback that records its connections."""

    def __init__(self, echo: bool = True, greeting: bytes = b"") -> None:
        self.connections: list[Recorder] = []
        self.echo = echo
        self.greeting = greeting
        self.port: Any = None

    @inlineCallbacks
    def start(self, host: str = "127.0.0.1"):
        def build() -> Recorder:
            r = Recorder(echo=self.echo, greeting=self.greeting)
            self.connections.append(r)
            return r

        self.port = yield TCP4ServerEndpoint(reactor, 0, interface=host).listen(
            Factory.forProtocol(build)
        )
        return self.port.getHost().port

    def stop(self) -> Deferred[Any]:
        return self.port.stopListening()


@inlineCallbacks
def connect_user(port: int, host: str = "127.0.0.1"):
    """Connect as an internet user; return the Recorder."""
    user = Recorder()
    yield connectProtocol(TCP4ClientEndpoint(reactor, host, port), user)
    return user


class Deployment:
    """A server and clients on loopback, built from real configs."""

    def __init__(self, use_tls: bool, tmpdir: str, **server_fields: Any) -> None:
        self.use_tls = use_tls
        self.pki = test_pki() if use_tls else None
        self.control_port = free_port()
        self.management_port = free_port()
        fields: dict[str, Any] = dict(
            tunnel_control_port=self.control_port,
            management_port=self.management_port,
            listen_address="127.0.0.1",
            management_listen_address="127.0.0.1",
            use_tls=use_tls,
            keepalive_interval_seconds=1.0,
            keepalive_timeout_seconds=5.0,
            source="server.json",
        )
        if self.pki is not None:
            fields.update(
                ca_certificate_file=self.pki.ca_cert,
                server_tls_key_file=self.pki.server_key,
                server_tls_certificate_file=self.pki.server_cert,
            )
        fields.update(server_fields)
        self.server_config = ServerConfig(**fields)
        self.server_service: MultiService | None = None
        self.clients: dict[str, MultiService] = {}
        self.tmpdir = tmpdir
        self.pools: dict[str, HTTPConnectionPool] = {}

    @property
    def server(self) -> Any:
        """The TunnelServer in the service tree."""
        assert self.server_service is not None
        return list(self.server_service)[0]

    def start_server(self) -> None:
        self.server_service = build_server(self.server_config, reactor)
        self.server_service.startService()

    @inlineCallbacks
    def stop_server(self):
        if self.server_service is not None:
            service, self.server_service = self.server_service, None
            yield service.stopService()
        # Kept-open API connections would still reach the stopped server.
        pools, self.pools = self.pools, {}
        for pool in pools.values():
            yield pool.closeCachedConnections()

    def client_config(
        self, client_id: str, services: dict[str, tuple[str, int]], **fields: Any
    ) -> ClientConfig:
        base: dict[str, Any] = dict(
            client_id=client_id,
            server_host="127.0.0.1",
            server_tunnel_control_port=self.control_port,
            use_tls=self.use_tls,
            service_to_local_addr_map=services,
            keepalive_interval_seconds=1.0,
            keepalive_timeout_seconds=5.0,
            reconnect_initial_delay_seconds=0.05,
            reconnect_max_delay_seconds=0.5,
            source="client.json",
        )
        if self.pki is not None:
            base.update(
                ca_certificate_file=self.pki.ca_cert,
                client_tls_key_file=self.pki.client_key(client_id),
                client_tls_certificate_file=self.pki.client_cert(client_id),
            )
        base.update(fields)
        return ClientConfig(**base)

    def start_client(
        self, client_id: str, services: dict[str, tuple[str, int]], **fields: Any
    ) -> MultiService:
        config = self.client_config(client_id, services, **fields)
        service = build_client(config, reactor)
        service.startService()
        self.clients[client_id] = service
        return service

    @inlineCallbacks
    def stop_client(self, client_id: str):
        service = self.clients.pop(client_id, None)
        if service is not None:
            yield service.stopService()

    @inlineCallbacks
    def stop(self):
        for client_id in list(self.clients):
            yield self.stop_client(client_id)
        yield self.stop_server()

    def wait_connected(self, client_id: str, timeout: float = 10.0) -> Deferred[Any]:
        return wait_until(
            lambda: (
                self.server_service is not None
                and self.server.registry.is_connected(client_id)
            ),
            timeout,
            f"client {client_id} to connect",
        )

    # -- management API -------------------------------------------------

    def http(self, cert_name: str = "operator") -> HTTPClient:
        # One pool per identity: a kept-open connection carries the
        # certificate it was made with.
        pool = self.pools.setdefault(cert_name, HTTPConnectionPool(reactor))
        if self.pki is None:
            return HTTPClient(Agent(reactor, pool=pool))
        policy = ClientCertPolicy(
            self.pki.ca_cert,
            self.pki.client_key(cert_name),
            self.pki.client_cert(cert_name),
        )
        return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))

    def url(self, path: str) -> str:
        scheme = "https" if self.use_tls else "http"
        host = "localhost" if self.use_tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.management_port}{path}"

    @inlineCallbacks
    def put_tunnels(self, tunnels: list[dict[str, Any]], cert_name: str = "operator"):
        """PUT /tunnels; return (status, decoded JSON body)."""
        response = yield self.http(cert_name).put(
            self.url("/tunnels"),
            data=json.dumps(tunnels).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        body = yield response.content()
        return response.code, json.loads(body)

    @inlineCallbacks
    def get_json(self, path: str, cert_name: str = "operator"):
        response = yield self.http(cert_name).get(self.url(path))
        body = yield response.content()
        return response.code, json.loads(body)


def tunnel(
    client_id: str, port: int, service: str, proxy: bool = False, **more: Any
) -> dict[str, Any]:
    """One tunnel entry as the API takes it."""
    entry = {
        "ClientId": client_id,
        "ListenAddress": "127.0.0.1",
        "ListenPort": port,
        "ListenHostnameGlob": "*",
        "BackEndService": service,
        "HaProxyProxyProtocol": proxy,
    }
    entry.update(more)
    return entry


def with_fields(config: Any, **fields: Any) -> Any:
    return replace(config, **fields)
