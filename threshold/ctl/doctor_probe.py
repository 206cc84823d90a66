"""The network side of ``threshold-ctl doctor``: resolve, connect, probe.

Each probe does what a user's program would (a DNS lookup, a TCP
connection, a TLS ClientHello or an HTTP request through the tunnel) and
returns what happened as data (:mod:`threshold.ctl.doctor_facts`), never
raising: the wording is :mod:`threshold.ctl.doctor_words`' business.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import socket
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.names import client as dns_client
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from threshold.ctl.doctor_facts import Answer, Connect, Ending, Probe, Resolution

#: How long a plain tunnel's service may take to speak first (SSH, SMTP)
#: before the HTTP request is sent.
GREETING_SECONDS = 0.5
#: Bytes of the answer kept: enough for a status line or a TLS record head.
KEEP_BYTES = 256


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (not a name)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    if not is_ip(host):
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


async def resolve(
    reactor: Any, name: str, dns_server: tuple[str, int] | None, timeout: float
) -> Resolution:
    """The name's A and AAAA addresses, from ``dns_server`` or the system."""
    if is_ip(name):
        return Resolution(name, (name,), None, None)
    if dns_server is None:
        return await _resolve_system(reactor, name, timeout)
    server = f"{dns_server[0]}:{dns_server[1]}"
    resolver = dns_client.Resolver(servers=[dns_server], reactor=reactor)
    addresses: list[str] = []
    no_name = False
    for lookup in (resolver.lookupAddress, resolver.lookupIPV6Address):
        try:
            answers, _, _ = await lookup(name, timeout=(timeout,))
        except dns_error.DNSNameError:
            no_name = True
            continue
        except (defer.TimeoutError, dns_error.DNSQueryTimeoutError):
            return Resolution(name, (), f"no answer from {server}", server)
        except dns_error.DomainError as e:
            return Resolution(name, (), f"{server} answered an error: {e}", server)
        for record in answers:
            if record.type in (dns.A, dns.AAAA):
                addresses.append(record.payload.dottedQuad())
    if not addresses:
        why = "no such name (NXDOMAIN)" if no_name else "no A or AAAA record"
        return Resolution(name, (), f"{server} says: {why}", server)
    return Resolution(name, tuple(dict.fromkeys(addresses)), None, server)


async def _resolve_system(reactor: Any, name: str, timeout: float) -> Resolution:
    d = deferToThreadPool(
        reactor,
        reactor.getThreadPool(),
        socket.getaddrinfo,
        name,
        None,
        0,
        socket.SOCK_STREAM,
    )
    d.addTimeout(timeout, reactor)
    try:
        infos = await d
    except socket.gaierror as e:
        return Resolution(name, (), f"the system resolver says: {e.strerror}", None)
    except defer.TimeoutError:
        return Resolution(name, (), "the system resolver gave no answer", None)
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    return Resolution(name, addresses, None, None)


class _Closer(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.lost.callback(None)


async def connect(reactor: Any, host: str, port: int, timeout: float) -> Connect:
    """Open a TCP connection as a user would, and close it at once."""
    closer = _Closer()
    try:
        await connectProtocol(_endpoint(reactor, host, port, timeout), closer)
    except error.ConnectionRefusedError:
        return Connect(False, "connection refused")
    except error.TimeoutError:
        return Connect(False, f"no answer within {timeout:g} seconds")
    except error.ConnectError as e:
        return Connect(False, str(e).strip() or type(e).__name__)
    await closer.lost
    return Connect(True, None)


def client_hello(name: str) -> bytes:
    """A real TLS ClientHello (OpenSSL's) naming ``name`` in its SNI."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    connection = SSL.Connection(context, None)
    connection.set_tlsext_host_name(name.encode("idna"))
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


def http_request(name: str) -> bytes:
    """The plain request the probe sends: HEAD / with the name as Host."""
    return (
        f"HEAD / HTTP/1.1\r\nHost: {name}\r\nUser-Agent: threshold-ctl doctor\r\n"
        "Connection: close\r\n\r\n"
    ).encode("idna" if not name.isascii() else "ascii")


class _ProbeState(enum.Enum):
    """Where a probe connection is."""

    #: Connected; waiting for the service to speak first (HTTP probe only).
    GREETING = "greeting"
    #: The probe is sent; waiting for the answer.
    SENT = "sent"
    #: The result is known; the connection is closing.
    DONE = "done"


_MOVES = {
    _ProbeState.GREETING: {_ProbeState.SENT, _ProbeState.DONE},
    _ProbeState.SENT: {_ProbeState.DONE},
    _ProbeState.DONE: set(),
}


class _Prober(Protocol, TimeoutMixin):
    """One connection through the tunnel: send the probe, note what comes back."""

    def __init__(self, reactor: Any, probe: Probe, payload: bytes, timeout: float):
        self.callLater = reactor.callLater  # TimeoutMixin's clock
        self.probe = probe
        self.payload = payload
        self.timeout = timeout
        self.state = _ProbeState.GREETING
        self.data = b""
        self.result: Deferred[tuple[Ending, bytes]] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._greeting: Any = None

    def _move(self, state: _ProbeState) -> bool:
        if state not in _MOVES[self.state]:
            return False
        self.state = state
        return True

    def connectionMade(self) -> None:  # noqa: N802
        self.setTimeout(self.timeout)
        if self.probe is Probe.HTTP:
            # Within the timeout, so that the request is always sent.
            wait = min(GREETING_SECONDS, self.timeout / 2)
            self._greeting = self.callLater(wait, self._send)
        else:
            self._send()

    def _send(self) -> None:
        if self._move(_ProbeState.SENT):
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data = (self.data + data)[:KEEP_BYTES]
        if (
            b"\n" in self.data
            or len(self.data) >= KEEP_BYTES
            or (self.probe is Probe.TLS and len(self.data) >= 5)
        ):
            self._finish(Ending.ANSWERED)

    def timeoutConnection(self) -> None:  # noqa: N802
        self._finish(Ending.ANSWERED if self.data else Ending.SILENT)

    def _finish(self, ending: Ending) -> None:
        if self._move(_ProbeState.DONE):
            self.result.callback((ending, self.data))
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.setTimeout(None)
        if self._greeting is not None and self._greeting.active():
            self._greeting.cancel()
        if self.data:
            self._finish(Ending.ANSWERED)
        elif reason.check(error.ConnectionDone):
            self._finish(Ending.CLOSED)
        else:
            self._finish(Ending.RESET)
        self.closed.callback(None)


async def through(
    reactor: Any, host: str, port: int, probe: Probe, name: str, timeout: float
) -> Answer:
    """Connect through the tunnel as a user and send ``probe``; say what came back."""
    payload = client_hello(name) if probe is Probe.TLS else http_request(name)
    prober = _Prober(reactor, probe, payload, timeout)
    started = reactor.seconds()
    try:
        await connectProtocol(_endpoint(reactor, host, port, timeout), prober)
    except error.ConnectError as e:
        return Answer(probe, Ending.RESET, b"", 0.0, str(e).strip())
    ending, data = await prober.result
    await prober.closed
    return Answer(probe, ending, data, reactor.seconds() - started, None)


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    def __init__(self) -> None:
        self.done: Deferred[Any] = Deferred()

    def handshakeCompleted(self) -> None:  # noqa: N802
        cert = self.transport.getPeerCertificate()
        self.done.callback(cert)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        if not self.done.called:
            self.done.errback(reason)


async def api_certificate_not_after(
    reactor: Any, host: str, port: int, policy: Any, timeout: float
) -> datetime.datetime:
    """When the certificate the management API presents expires (UTC)."""
    creator = policy.creatorForNetloc(host.encode("idna"), port)
    endpoint = wrapClientTLS(creator, _endpoint(reactor, host, port, timeout))
    handshake = _Handshake()
    await connectProtocol(endpoint, handshake)
    d = handshake.done
    d.addTimeout(timeout, reactor)
    cert = await d
    return cert.to_cryptography().not_valid_after_utc
