"""Fixtures for the doctor tests: a DNS server, HTTP backends, a deployment.

- :class:`DnsServer`: a twisted.names server on loopback UDP answering A
  records from a dict (a name not in it: NXDOMAIN).
- :func:`http_backend`: a real twisted.web server, optionally behind
  Twisted's own PROXY-protocol wrapper (it closes a connection that does
  not start with a PROXY header).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.names import dns, server
from twisted.names import error as dns_error
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Site


class _Answers:
    """A resolver for DNSServerFactory: A records from a dict."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records

    def query(self, query: dns.Query, timeout: Any = None) -> defer.Deferred[Any]:
        name = query.name.name.decode("ascii").lower()
        if name not in self.records:
            return defer.fail(dns_error.DNSNameError(name))
        answers = []
        if query.type == dns.A:
            answers = [
                dns.RRHeader(
                    name=query.name.name,
                    type=dns.A,
                    payload=dns.Record_A(address, ttl=60),
                    ttl=60,
                    auth=True,
                )
                for address in self.records[name]
            ]
        return defer.succeed((answers, [], []))


class DnsServer:
    """A DNS server on 127.0.0.1 (UDP) answering ``records``."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.port: Any = None

    def start(self) -> str:
        """Listen; return HOST:PORT for --dns-server."""
        factory = server.DNSServerFactory(clients=[_Answers(self.records)])
        protocol = dns.DNSDatagramProtocol(factory)
        self.port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        return f"127.0.0.1:{self.port.getHost().port}"

    def stop(self) -> Any:
        return self.port.stopListening()


class _Page(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        return b"hello\n"

    render_HEAD = render_GET  # noqa: N815


@inlineCallbacks
def http_backend(expects_proxy: bool = False):
    """A real HTTP server on loopback; return its listening port."""
    factory: Any = Site(_Page())
    if expects_proxy:
        factory = HAProxyWrappingFactory(factory)
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return port


@inlineCallbacks
def tls_backend(cert_file: str, key_file: str):
    """A real HTTPS server on loopback (Twisted's TLS); return its port."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ServerEndpoint

    with open(cert_file, "rb") as c, open(key_file, "rb") as k:
        identity = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
    endpoint = SSL4ServerEndpoint(reactor, 0, identity.options(), interface="127.0.0.1")
    port = yield endpoint.listen(Site(_Page()))
    return port
