"""Attacks on the tunnel control port with real sockets and a real TLS client.

Connections that never start TLS cost an attacker nothing. Refreshed as
they time out, from one or many addresses, they must not keep a real
tunnel client from connecting; each must be cut at the handshake timeout;
and one refused past the limits must be closed at once (under TLS too).
A client's Go Away must show at once in the registry.
"""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.support import Deployment, connect_user, free_port, tunnel, wait_until
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.server.stats import HandshakeFailure, Limit
from threshold.testing import Collector
from threshold.wire.handshake import encode_hello

CLIENT = "TestClient1"


class Silent(Protocol):
    """Connects, never starts TLS, records when the server closed it."""

    def __init__(self, on_lost=None) -> None:
        self.opened = time.monotonic()
        self.closed_after: float | None = None
        self.done: Deferred[None] = Deferred()
        self.on_lost = on_lost

    def connectionLost(self, reason) -> None:  # noqa: N802
        self.closed_after = time.monotonic() - self.opened
        self.done.callback(None)
        if self.on_lost is not None:
            self.on_lost(self)


class Flood:
    """Silent connections from several addresses, each reopened when cut."""

    def __init__(self, port: int, sources: list[str], per_source: int) -> None:
        self.port = port
        self.sources = sources
        self.per_source = per_source
        self.open: set[Silent] = set()
        self.connecting: set[Deferred] = set()
        self.retries: list = []
        self.opened = 0
        self.running = False

    def start(self) -> None:
        self.running = True
        for source in self.sources:
            for _ in range(self.per_source):
                self._connect(source)

    def _connect(self, source: str) -> None:
        if not self.running:
            return
        protocol = Silent(lambda p: self._lost(p, source))
        endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port, timeout=5, bindAddress=(source, 0)
        )
        self.opened += 1
        d = endpoint.connect(Factory.forProtocol(lambda: protocol))
        self.connecting.add(d)
        d.addBoth(self._settled, d)
        d.addCallback(self.open.add)
        d.addErrback(self._failed, source)

    def _settled(self, result, d: Deferred) -> object:
        self.connecting.discard(d)
        return result

    def _failed(self, failure, source: str) -> None:
        if self.running:
            self.retries.append(reactor.callLater(0.01, self._connect, source))

    def _lost(self, protocol: Silent, source: str) -> None:
        self.open.discard(protocol)
        # Refresh at once, as the attack does.
        if self.running:
            self._connect(source)

    def stop(self) -> Deferred[list[None]]:
        self.running = False
        for call in self.retries:
            if call.active():
                call.cancel()
        for d in list(self.connecting):
            d.cancel()
        held = list(self.open)
        for protocol in held:
            protocol.transport.abortConnection()
        return gatherResults([p.done for p in held])


async def silent(port: int, source: str = "127.0.0.2") -> Silent:
    protocol = Silent()
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, timeout=5, bindAddress=(source, 0)
    )
    await endpoint.connect(Factory.forProtocol(lambda: protocol))
    return protocol


class ControlAttackTests(TestCase):
    timeout = 40

    def deployment(self, **fields) -> Deployment:
        deployment = Deployment(True, self.mktemp(), **fields)
        deployment.start_server()
        self.addCleanup(deployment.stop)
        return deployment

    async def test_silent_flood_does_not_lock_a_client_out(self):
        """Ten addresses hold every pending slot with connections that never
        start TLS, refreshed as they are cut; a real TLS client from
        127.0.0.1 still connects, and stays connected."""
        deployment = self.deployment(
            max_pending_handshakes=20,
            max_pending_handshakes_per_source_ip=4,
            handshake_timeout_seconds=1.0,
        )
        flood = Flood(
            deployment.control_port, [f"127.0.0.{n}" for n in range(2, 12)], 8
        )
        flood.start()
        self.addCleanup(flood.stop)
        pending = deployment.server.control_factory().pending
        await wait_until(lambda: len(pending) == 20, what="the flood to fill")
        started = time.monotonic()
        deployment.start_client(CLIENT, {})
        await deployment.wait_connected(CLIENT, timeout=10)
        took = time.monotonic() - started
        self.assertLess(took, 3.0)
        # The flood goes on past a whole handshake timeout; the client stays.
        await wait_until(lambda: time.monotonic() - started > 2.5, what="time")
        self.assertTrue(deployment.server.registry.is_connected(CLIENT))
        self.assertEqual(deployment.server.registry.records()[0].connections, 1)
        self.assertGreater(flood.opened, 80)
        stats = deployment.server.stats
        self.assertGreater(stats.limits_hit[Limit.PENDING_HANDSHAKES_PER_SOURCE], 0)

    async def test_no_tls_cut_at_handshake_timeout(self):
        """A connection that never starts TLS is cut at HandshakeTimeoutSeconds
        (the clock starts at the TCP accept, before any TLS)."""
        deployment = self.deployment(handshake_timeout_seconds=0.5)
        connection = await silent(deployment.control_port)
        await connection.done
        self.assertGreater(connection.closed_after, 0.4)
        self.assertLess(connection.closed_after, 1.5)
        failures = deployment.server.stats.handshake_failures
        self.assertEqual(failures[HandshakeFailure.TIMEOUT], 1)

    async def test_refused_connection_closed_at_once_under_tls(self):
        """Past a source's share a connection is closed at once, not left
        open unserved (as a factory's None is under TLS)."""
        deployment = self.deployment(max_pending_handshakes_per_source_ip=2)
        port = deployment.control_port
        held = [await silent(port) for _ in range(2)]
        extra = await silent(port)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in held])
        await extra.done
        self.assertLess(extra.closed_after, 1.0)
        self.assertTrue(all(c.closed_after is None for c in held))
        self.assertEqual(self.flushLoggedErrors(), [])


class GoAwayTests(TestCase):
    timeout = 20

    async def test_go_away_shows_closed_at_once(self):
        """A client that sends Go Away while a user's stream still runs is
        ClientClosed in GET /clients at once, not when the stream ends."""
        deployment = Deployment(False, self.mktemp())
        deployment.start_server()
        self.addCleanup(deployment.stop)
        streams: list[Collector] = []

        def accept(stream):
            streams.append(Collector())
            return streams[-1]

        client = MuxSession(
            client=True,
            clock=reactor,
            handler=StreamAcceptor(accept),
            config=SessionConfig(keepalive_interval=0),
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", deployment.control_port)
        await endpoint.connect(Factory.forProtocol(lambda: client))
        self.addCleanup(client.close)
        reply = Collector()
        client.open_stream(reply).write(encode_hello(CLIENT))
        await wait_until(lambda: b"\n" in reply.data, what="the hello reply")
        port = free_port()
        code, _ = await deployment.put_tunnels([tunnel(CLIENT, port, "svc")])
        self.assertEqual(code, 200)
        user = await connect_user(port)
        self.addCleanup(user.transport.abortConnection)
        await wait_until(lambda: streams, what="the user's stream")

        client.go_away()
        went_away = time.monotonic()

        async def state() -> str:
            code, clients = await deployment.get_json("/clients")
            return clients[CLIENT]["CurrentState"]

        while await state() != "ClientClosed":
            self.assertLess(time.monotonic() - went_away, 2.0, "still connected")
        self.assertLess(time.monotonic() - went_away, 1.0)
        # The user's stream is still up: only the client's state changed.
        self.assertIsNone(user.lost)
        self.assertIsNone(streams[0].lost)
