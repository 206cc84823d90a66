"""The PROXY protocol end to end: what a backend behind the tunnel receives.

A real server and client on loopback, a recording backend, users on IPv4
and IPv6 loopback. The header the backend receives is read by the
independent proxy-protocol package: its source must be the user's socket
address and its destination the tunnel listener's, and the bytes after it
must be the user's, unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

from proxyprotocol.result import ProxyResult, ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.components import missing
from tests.support import (
    Backend,
    Deployment,
    Recorder,
    free_port,
    tunnel,
    wait_until,
)
from tests.tlshello import python_hello

CLIENT = "TestClient1"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def ipv6_loopback() -> bool:
    """Whether this host can listen on ::1."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def split_header(data: bytes) -> tuple[int, bytes, bytes]:
    """Split a stream start into (version, PROXY header, rest).

    Finds the header's end from the spec alone (a v1 line ends with CRLF; a
    v2 header is 16 bytes plus the length in bytes 14-15), so that the
    split does not rely on threshold's code.
    """
    if data.startswith(V2_SIGNATURE):
        end = 16 + int.from_bytes(data[14:16], "big")
        return 2, data[:end], data[end:]
    if data.startswith(b"PROXY "):
        end = data.index(b"\r\n") + 2
        return 1, data[:end], data[end:]
    raise AssertionError(f"no PROXY header at the start of {data[:40]!r}")


def parse_header(version: int, header: bytes) -> ProxyResult:
    """Parse a whole header with the proxy-protocol package."""
    parser = ProxyProtocolV1() if version == 1 else ProxyProtocolV2()
    assert parser.is_valid(header[:8]), f"not a v{version} header: {header!r}"
    return parser.unpack(header)


def endpoints(result: ProxyResult) -> tuple[tuple[str, int], tuple[str, int]]:
    """The parsed (ip, port) of source and destination, ips as text."""
    (src_ip, src_port), (dst_ip, dst_port) = result.source, result.dest
    return (str(src_ip), src_port), (str(dst_ip), dst_port)


class _Once(Factory):
    """A client factory that hands out one given protocol."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        return self._protocol


@inlineCallbacks
def connect(host: str, port: int):
    """Connect a recording user over IPv4 or IPv6 loopback; return it."""
    user = Recorder()
    if ":" in host:
        endpoint = TCP6ClientEndpoint(reactor, host, port)
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port)
    yield endpoint.connect(_Once(user))
    return user


class ProxyProtocolTests(TestCase):
    """PROXY headers v1 and v2, IPv4 and IPv6, through a real tunnel."""

    timeout = 20

    @inlineCallbacks
    def setUp(self):
        self.backend = Backend(echo=False)
        backend_port = yield self.backend.start()
        self.addCleanup(self.backend.stop)
        self.deployment = Deployment(False, self.mktemp())
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.deployment.start_client(CLIENT, {"web": ("127.0.0.1", backend_port)})
        yield self.deployment.wait_connected(CLIENT)

    @inlineCallbacks
    def open_tunnel(self, host: str, **fields: Any):
        """Open one proxied tunnel on ``host``; return its port."""
        if ":" in host and not ipv6_loopback():
            raise missing("no IPv6 loopback on this host")
        port = free_port(host)
        entry = tunnel(CLIENT, port, "web", proxy=True, ListenAddress=host)
        entry.update(fields)
        code, body = yield self.deployment.put_tunnels([entry])
        self.assertEqual(code, 200, body)
        return port

    @inlineCallbacks
    def send_all(self, host: str, port: int, payload: bytes):
        """Send ``payload`` as a user and half-close; return (user, backend side).

        Returns once the backend has seen the EOF and both sides are closed,
        so the backend side holds everything the tunnel delivered.
        """
        before = len(self.backend.connections)
        user = yield connect(host, port)
        user.transport.write(payload)
        user.transport.loseWriteConnection()
        yield wait_until(lambda: user.lost is not None, timeout=5, what="the end")
        self.assertEqual(len(self.backend.connections), before + 1)
        connection = self.backend.connections[-1]
        yield connection.done
        self.assertTrue(connection.eof)
        return user, connection

    @inlineCallbacks
    def check(self, version: int, host: str, **fields: Any):
        """One user's header names it and the listener; its bytes follow intact."""
        port = yield self.open_tunnel(host, **fields)
        payload = os.urandom(100_000)
        user, connection = yield self.send_all(host, port, payload)
        found, header, rest = split_header(connection.data)
        self.assertEqual(found, version)
        result = parse_header(version, header)
        family = ProxyResultIPv6 if ":" in host else ProxyResultIPv4
        self.assertIsInstance(result, family)
        self.assertTrue(result.proxied)
        # The user's own socket address is the header's source.
        user_address = user.host
        self.assertEqual(user_address.host, host)
        self.assertEqual(
            endpoints(result),
            ((host, user_address.port), (host, port)),
        )
        self.assertEqual(len(rest), len(payload))
        self.assertEqual(rest, payload)
        return header

    @inlineCallbacks
    def test_v1_ipv4(self):
        """Version 1 is the default: a TCP4 line with the user and listener."""
        header = yield self.check(1, "127.0.0.1")
        self.assertTrue(header.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 "))

    @inlineCallbacks
    def test_v1_ipv6(self):
        """Version 1 on an IPv6 listener: a TCP6 line with ::1 both ends."""
        header = yield self.check(1, "::1", HaProxyProxyProtocolVersion=1)
        self.assertTrue(header.startswith(b"PROXY TCP6 ::1 ::1 "))

    @inlineCallbacks
    def test_v2_ipv4(self):
        """Version 2 on an IPv4 listener: binary, family TCP over IPv4."""
        header = yield self.check(2, "127.0.0.1", HaProxyProxyProtocolVersion=2)
        self.assertEqual(header[12:16], b"\x21\x11\x00\x0c")

    @inlineCallbacks
    def test_v2_ipv6(self):
        """Version 2 on an IPv6 listener: binary, family TCP over IPv6."""
        header = yield self.check(2, "::1", HaProxyProxyProtocolVersion=2)
        self.assertEqual(header[12:16], b"\x21\x21\x00\x24")
        self.assertEqual(header[16:32], ipaddress.IPv6Address("::1").packed)

    @inlineCallbacks
    def test_no_header_without_the_flag(self):
        """Without HaProxyProxyProtocol the backend gets the user's bytes only."""
        port = yield self.open_tunnel("127.0.0.1", HaProxyProxyProtocol=False)
        payload = b"PROXY is not sent\r\n" + os.urandom(1000)
        _, connection = yield self.send_all("127.0.0.1", port, payload)
        self.assertEqual(connection.data, payload)

    @inlineCallbacks
    def test_header_before_the_user_speaks(self):
        """On a '*' tunnel the header arrives before the user sends anything."""
        port = yield self.open_tunnel("127.0.0.1", HaProxyProxyProtocolVersion=2)
        user = yield connect("127.0.0.1", port)
        yield wait_until(
            lambda: (
                self.backend.connections and len(self.backend.connections[0].data) >= 28
            ),
            timeout=5,
            what="the header",
        )
        connection = self.backend.connections[0]
        version, header, rest = split_header(connection.data)
        self.assertEqual((version, rest), (2, b""))
        self.assertEqual(
            endpoints(parse_header(2, header)),
            (("127.0.0.1", user.host.port), ("127.0.0.1", port)),
        )
        user.transport.loseConnection()
        yield user.done
        yield connection.done

    @inlineCallbacks
    def test_header_then_replayed_hello(self):
        """On an SNI tunnel the header comes first, then the hello unchanged."""
        if not ipv6_loopback():
            raise missing("no IPv6 loopback on this host")
        port = free_port("::1")
        entries = [
            tunnel(
                CLIENT,
                port,
                "web",
                proxy=True,
                ListenAddress="::1",
                ListenHostnameGlob=glob,
                HaProxyProxyProtocolVersion=version,
            )
            for glob, version in [("a.example.com", 1), ("*", 2)]
        ]
        code, body = yield self.deployment.put_tunnels(entries)
        self.assertEqual(code, 200, body)
        for name, version in [("a.example.com", 1), ("other.org", 2)]:
            hello = python_hello(name)
            user, connection = yield self.send_all("::1", port, hello + b"after")
            found, header, rest = split_header(connection.data)
            self.assertEqual(found, version, name)
            self.assertEqual(
                endpoints(parse_header(version, header)),
                (("::1", user.host.port), ("::1", port)),
            )
            self.assertEqual(rest, hello + b"after")

    @inlineCallbacks
    def test_concurrent_users_each_named(self):
        """Concurrent users: each backend connection's header names its own user."""
        port = yield self.open_tunnel("127.0.0.1", HaProxyProxyProtocolVersion=2)
        users = []
        for i in range(10):
            user = yield connect("127.0.0.1", port)
            user.transport.write(b"user %d" % i)
            user.transport.loseWriteConnection()
            users.append(user)
        for user in users:
            yield wait_until(lambda u=user: u.lost is not None, timeout=5)
        self.assertEqual(len(self.backend.connections), len(users))
        seen = {}
        for connection in self.backend.connections:
            yield connection.done
            _, header, rest = split_header(connection.data)
            (_, source_port), _ = endpoints(parse_header(2, header))
            seen[source_port] = rest
        self.assertEqual(
            seen,
            {u.host.port: b"user %d" % i for i, u in enumerate(users)},
        )
