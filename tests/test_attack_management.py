"""Attacks on the management port with real sockets: what a peer may hold.

Before authentication (a complete request head, over TLS with a client
certificate) a connection is cheap for an attacker: silent ones from one
or many loopback addresses must not lock the operator out, nor be held
open long; and a refused upload must not keep its connection.
"""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests import tlsraw
from tests.support import Deployment, wait_until
from threshold.server.site import ManagementSite
from threshold.server.stats import Limit


class Silent(Protocol):
    """Connects, sends nothing, records when the server closed it."""

    def __init__(self) -> None:
        self.opened = time.monotonic()
        self.closed_after: float | None = None
        self.done: Deferred[None] = Deferred()

    def connectionLost(self, reason) -> None:  # noqa: N802
        self.closed_after = time.monotonic() - self.opened
        self.done.callback(None)


async def silent(port: int, source: str) -> Silent:
    """A silent TCP connection to ``port`` from the loopback address ``source``."""
    protocol = Silent()
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, timeout=5, bindAddress=(source, 0)
    )
    await endpoint.connect(Factory.forProtocol(lambda: protocol))
    return protocol


def management_site_of(deployment: Deployment) -> ManagementSite:
    """The Site of the deployment's management listener."""
    assert deployment.server_service is not None
    for service in deployment.server_service:
        factory = getattr(service, "factory", None)
        factory = getattr(factory, "made", factory)  # tap.common.LazyFactory
        if isinstance(factory, ManagementSite):
            return factory
    raise AssertionError("no management listener")


class ManagementAttackTests(TestCase):
    timeout = 30

    def deployment(self, **fields) -> Deployment:
        deployment = Deployment(True, self.mktemp(), **fields)
        deployment.start_server()
        self.addCleanup(deployment.stop)
        return deployment

    def hold(self, connections: list[Silent]) -> None:
        def close() -> Deferred[list[None]]:
            for c in connections:
                if c.closed_after is None:
                    c.transport.abortConnection()
            return gatherResults([c.done for c in connections])

        self.addCleanup(close)

    async def ping(self, deployment: Deployment) -> bytes:
        response = await deployment.http().get(deployment.url("/ping"))
        return await response.content()

    async def test_413_over_tls_closes_at_once(self):
        """After a 413 the server closes the TCP connection within a second,
        even for a client that never answers TLS close_notify."""
        deployment = self.deployment(max_management_body_bytes=1024)
        pki = deployment.pki
        for body in (
            b"Content-Length: 100000\r\n\r\n[",
            b"Transfer-Encoding: chunked\r\n\r\n800\r\n" + b" " * 2048 + b"\r\n",
        ):
            result = await deferToThread(
                tlsraw.exchange,
                deployment.management_port,
                pki.ca_cert,
                pki.client_cert("operator"),
                pki.client_key("operator"),
                b"PUT /tunnels HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n" + body,
                5.0,
            )
            self.assertTrue(result.answer.startswith(b"HTTP/1.1 413 "), result)
            self.assertIsNotNone(result.closed_after, "still open after 5 s")
            self.assertLess(result.closed_after, 1.0)

    async def test_one_source_gets_its_share(self):
        """Silent connections from one address get a share; the rest are cut
        at once, and the operator still gets in."""
        deployment = self.deployment(
            max_pending_management_connections=64,
            max_pending_management_connections_per_source_ip=8,
        )
        port = deployment.management_port
        held = [await silent(port, "127.0.0.2") for _ in range(20)]
        self.hold(held)
        cut = held[8:]
        await wait_until(lambda: all(c.closed_after is not None for c in cut))
        self.assertTrue(all(c.closed_after < 1.0 for c in cut))
        self.assertTrue(all(c.closed_after is None for c in held[:8]))
        self.assertEqual(await self.ping(deployment), b"pong")
        stats = deployment.server.stats
        self.assertEqual(stats.limits_hit[Limit.PENDING_MANAGEMENT_PER_SOURCE], 12)

    async def test_many_sources_cannot_lock_the_operator_out(self):
        """Sources filling every pending slot still leave the operator a way
        in: the newcomer takes the oldest slot of a source holding the most."""
        deployment = self.deployment(
            max_pending_management_connections=16,
            max_pending_management_connections_per_source_ip=4,
        )
        port = deployment.management_port
        held = [
            await silent(port, f"127.0.0.{source}")
            for source in range(2, 6)
            for _ in range(4)
        ]
        self.hold(held)
        self.assertEqual(len(management_site_of(deployment).pending), 16)
        for _ in range(3):
            self.assertEqual(await self.ping(deployment), b"pong")
        self.assertEqual(sum(1 for c in held if c.closed_after is not None), 1)

    async def test_silent_connection_cut_at_request_timeout(self):
        """A connection that sends no request is closed after
        ManagementRequestTimeoutSeconds, TLS handshake included."""
        deployment = self.deployment(management_request_timeout_seconds=0.5)
        connection = await silent(deployment.management_port, "127.0.0.2")
        self.hold([connection])
        await connection.done
        self.assertGreater(connection.closed_after, 0.4)
        self.assertLess(connection.closed_after, 0.5 + 1.0)
        self.assertEqual(
            deployment.server.stats.limits_hit[Limit.MANAGEMENT_REQUEST_TIMEOUT], 1
        )
