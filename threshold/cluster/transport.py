"""HTTP plumbing of the etcd client: endpoints, TLS, bodies and failures.

Kept apart from the client's API so each stays short; nothing here knows
etcd's methods.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from threshold.cluster.kv import EtcdError, MalformedAnswer
from threshold.config import ConfigError
from threshold.tls import ClientCertPolicy

#: etcd's client port when an endpoint names none.
DEFAULT_PORT = 2379
#: The largest answer read (a range of every presence key of a large fleet
#: fits many times over; etcd's own request limit is 1.5 MiB by default).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: ConfigError fields of threshold.tls, as the etcd settings are named.
_TLS_FIELDS = {
    "CaCertificateFile": "EtcdCaCertificateFile",
    "ClientTlsCertificateFile": "EtcdClientCertificateFile",
    "ClientTlsKeyFile": "EtcdClientKeyFile",
}


def parse_endpoint(endpoint: str, source: str = "config") -> str:
    """Check an endpoint URL (``http(s)://host[:port]``); return it normalised."""
    parts = urlsplit(endpoint)
    problem = None
    try:
        port = parts.port
    except ValueError:
        port, problem = None, "has an invalid port"
    if parts.scheme not in ("http", "https"):
        problem = "must start with http:// or https://"
    elif not parts.hostname:
        problem = "names no host"
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
        problem = "must not have a path, query or fragment"
    elif parts.username or parts.password:
        problem = "must not carry a user name or password"
    if problem is not None:
        raise ConfigError(source, f"endpoint {endpoint!r} {problem}", "EtcdEndpoints")
    host = parts.hostname
    assert host is not None
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port or DEFAULT_PORT}"


def tls_policy(tls: tuple[str, str, str], source: str) -> ClientCertPolicy:
    ca, cert, key = tls
    try:
        return ClientCertPolicy(ca, key, cert, source)
    except ConfigError as e:
        field = _TLS_FIELDS.get(e.field or "", e.field)
        raise ConfigError(source, e.message, field) from None


class AttemptTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:g} s")


def describe(failure: Failure) -> str:
    """One line for a transport failure (the wrapped causes of web errors)."""
    value = failure.value
    if isinstance(value, ResponseFailed):
        inner = "; ".join(
            r.getErrorMessage() for r in value.reasons if isinstance(r, Failure)
        )
        return f"{type(value).__name__}: {inner}"
    return f"{type(value).__name__}: {failure.getErrorMessage()}"


def never_sent(failure: Failure) -> bool:
    """True when the request surely never reached etcd's API."""
    if failure.check(error.ConnectError):
        return True
    value = failure.value
    if isinstance(value, ResponseNeverReceived):
        # A failed TLS handshake: etcd read no request bytes.
        return any(isinstance(r, Failure) and r.check(SSL.Error) for r in value.reasons)
    return False


class _Body(Protocol):
    """Collect a response body up to a bound; cancelling drops the connection."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.deferred: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.deferred.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._stop()
            self.deferred.errback(ValueError(f"answer over {self._limit} bytes"))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # noqa: N802
        if self.deferred.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.deferred.callback(b"".join(self._parts))
        else:
            self.deferred.errback(reason)

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._stop()


def read_body(response: IResponse, limit: int = MAX_ANSWER_BYTES) -> Deferred[bytes]:
    """The whole body of ``response`` (at most ``limit`` bytes)."""
    body = _Body(limit)
    response.deliverBody(body)
    return body.deferred


def decode_answer(endpoint: str, code: int, data: bytes) -> dict[str, Any]:
    """The JSON object of an answer (HTTP status ``code``), or MalformedAnswer."""
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        # Not etcd's gateway (a wrong port, a proxy's error page): show it.
        raise MalformedAnswer(
            endpoint, f"HTTP {code}, not a JSON object: {data[:80]!r}"
        )
    return answer


def answer_error(endpoint: str, answer: dict[str, Any]) -> EtcdError:
    """The EtcdError of an error answer (``{"code", "message"}``)."""
    code = answer.get("code")
    message = answer.get("message") or answer.get("error") or "error"
    return EtcdError(endpoint, code if isinstance(code, int) else None, str(message))


class Connections:
    """The client's open connections, so that closing can wait for them all."""

    def __init__(self) -> None:
        self.open: set[ProtocolWrapper] = set()
        self._waiting: list[Deferred[None]] = []

    def add(self, protocol: ProtocolWrapper) -> None:
        self.open.add(protocol)

    def remove(self, protocol: ProtocolWrapper) -> None:
        self.open.discard(protocol)
        if not self.open:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def close_all(self) -> Deferred[None]:
        """Abort every connection; fires once each is gone."""
        if not self.open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        for protocol in list(self.open):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        return d


class _Tracking(WrappingFactory):
    def __init__(self, wrapped: Factory, connections: Connections) -> None:
        super().__init__(wrapped)
        self._connections = connections

    def registerProtocol(self, p: ProtocolWrapper) -> None:  # noqa: N802
        self._connections.add(p)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:  # noqa: N802
        self._connections.remove(p)


@implementer(IStreamClientEndpoint)
class _TrackedEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint, connections: Connections):
        self._endpoint = endpoint
        self._connections = connections

    def connect(self, factory: Factory) -> Deferred[IProtocol]:
        d = self._endpoint.connect(_Tracking(factory, self._connections))
        return d.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class TrackedEndpoints:
    """Agent endpoints as Twisted's own (TCP, TLS for https), each tracked."""

    def __init__(
        self,
        reactor: Any,
        policy: IPolicyForHTTPS | None,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout
        self.connections = Connections()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, uri.port, timeout=self._timeout
        )
        if uri.scheme == b"https":
            if self._policy is None:
                raise ValueError("https without TLS settings")
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return _TrackedEndpoint(endpoint, self.connections)
