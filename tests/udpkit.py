"""Real UDP peers on loopback for the UDP tunnel tests and benchmark.

An echo service that records what it got and from where, a user socket
that collects answers, and a small DNS server (twisted.names) with one
name.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.names import common, dns, error, server


def _buffers(port: Any) -> None:
    import socket

    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        port.socket.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)


class UdpEcho(DatagramProtocol):
    """A UDP service: answers each datagram with ``prefix`` + the datagram."""

    def __init__(self, prefix: bytes = b"", answer: bool = True) -> None:
        self.prefix = prefix
        self.answer = answer
        #: (datagram, source address) in arrival order.
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.port: Any = None

    def start(self, host: str = "127.0.0.1") -> int:
        self.port = reactor.listenUDP(0, self, interface=host, maxPacketSize=65536)
        _buffers(self.port)
        return self.port.getHost().port

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:  # noqa: N802
        self.received.append((data, addr))
        if self.answer:
            self.transport.write(self.prefix + data, addr)

    def sources(self) -> set[tuple[str, int]]:
        """The distinct source addresses seen (one per tunnel flow)."""
        return {addr for _, addr in self.received}

    def stop(self) -> Any:
        return self.port.stopListening() if self.port is not None else None


class UdpUser(DatagramProtocol):
    """An internet user's UDP socket, connected to the tunnel's port."""

    def __init__(self) -> None:
        self.answers: list[bytes] = []
        self.port: Any = None

    def start(self, port: int, host: str = "127.0.0.1") -> UdpUser:
        self.port = reactor.listenUDP(0, self, interface=host, maxPacketSize=65536)
        _buffers(self.port)
        self.port.connect(host, port)
        return self

    @property
    def address(self) -> tuple[str, int]:
        host = self.port.getHost()
        return (host.host, host.port)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        self.answers.append(data)

    def connectionRefused(self) -> None:  # noqa: N802
        pass

    def stop(self) -> Any:
        return self.port.stopListening() if self.port is not None else None


#: The one name the test DNS server knows, and its address.
DNS_NAME = b"service.threshold.test"
DNS_ADDRESS = "192.0.2.53"


class _OneName(common.ResolverBase):
    """An authority for one A record."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
        if name.lower() == DNS_NAME and type in (dns.A, dns.ALL_RECORDS):
            record = dns.RRHeader(
                name=name,
                type=dns.A,
                ttl=60,
                payload=dns.Record_A(DNS_ADDRESS, ttl=60),
                auth=True,
            )
            return defer.succeed(([record], [], []))
        return defer.fail(error.DomainError(name))


def start_dns(host: str = "127.0.0.1") -> tuple[Any, int]:
    """A twisted.names DNS server on UDP loopback: (listening port, port number)."""
    factory = server.DNSServerFactory(authorities=[_OneName()])
    factory.noisy = False
    protocol = dns.DNSDatagramProtocol(controller=factory)
    port = reactor.listenUDP(0, protocol, interface=host)
    return port, port.getHost().port


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port free on ``host`` now."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
