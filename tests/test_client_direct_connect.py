"""Connecting a service stream's local end with connectTCP (no endpoint chain)."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, UserError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from threshold.client.endpoints import (
    DirectTCP4Endpoint,
    DirectTCP6Endpoint,
    connect_relay,
    local_tcp_endpoint,
)
from threshold.relay import RelayEnd


class Outcome:
    """Records which of the two callbacks ran, and with what."""

    def __init__(self) -> None:
        self.connected: list[RelayEnd] = []
        self.failed: list = []

    def on_connected(self, end: RelayEnd) -> None:
        self.connected.append(end)

    def on_failed(self, failure) -> None:
        self.failed.append(failure)


class DirectConnectTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.outcome = Outcome()

    def connect(self, host="127.0.0.1"):
        endpoint = local_tcp_endpoint(self.reactor, 7)(host, 8080)
        return connect_relay(
            endpoint, self.outcome.on_connected, self.outcome.on_failed
        )

    def test_addresses_get_direct_endpoints(self):
        """IPv4 and IPv6 literals get the endpoints that connect directly."""
        make = local_tcp_endpoint(self.reactor, 7)
        self.assertIsInstance(make("127.0.0.1", 1), DirectTCP4Endpoint)
        self.assertIsInstance(make("::1", 1), DirectTCP6Endpoint)

    def test_uses_connect_tcp_with_the_timeout(self):
        """One connectTCP to the address, with the connect timeout, quiet."""
        self.connect()
        [(host, port, factory, timeout, bind)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout, bind), ("127.0.0.1", 8080, 7, None))
        self.assertFalse(factory.noisy)

    def test_ipv6_address(self):
        """An IPv6 literal is connected the same way."""
        self.connect("::1")
        self.assertEqual(self.reactor.tcpClients[0][0], "::1")

    def test_connected_once_made(self):
        """The callback gets the relay end, its transport connected."""
        self.connect()
        factory = self.reactor.tcpClients[0][2]
        end = factory.buildProtocol(None)
        self.assertEqual(self.outcome.connected, [])
        transport = StringTransport()
        end.makeConnection(transport)
        self.assertEqual(self.outcome.connected, [end])
        self.assertIsInstance(end, RelayEnd)
        self.assertIs(end.transport, transport)
        self.assertEqual(self.outcome.failed, [])

    def test_failure_reported(self):
        """A refused connection calls ``failed`` with the reason, only that."""
        self.connect()
        connector = self.reactor.connectors[0]
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        [failure] = self.outcome.failed
        self.assertTrue(failure.check(ConnectionRefusedError))
        self.assertEqual(self.outcome.connected, [])

    def test_cancel_stops_connecting(self):
        """The canceller stops an attempt in progress, and is a no-op after."""
        cancel = self.connect()
        connector = self.reactor.connectors[0]
        stopped = []
        connector.state = "connecting"
        connector.stopConnecting = lambda: stopped.append(True)
        cancel()
        self.assertEqual(stopped, [True])
        connector.state = "connected"
        cancel()
        self.assertEqual(stopped, [True])

    def test_other_endpoints_through_connect(self):
        """An endpoint without the direct path is connected with its Deferred."""
        d: Deferred = Deferred()

        class Endpoint:
            def connect(self, factory):
                self.factory = factory
                return d

        endpoint = Endpoint()
        cancel = connect_relay(
            endpoint, self.outcome.on_connected, self.outcome.on_failed
        )
        end = endpoint.factory.buildProtocol(None)
        self.assertFalse(endpoint.factory.noisy)
        d.callback(end)
        self.assertEqual(self.outcome.connected, [end])
        cancel()  # fired already: nothing happens
        self.assertEqual(self.outcome.failed, [])


class Echo(Protocol):
    def dataReceived(self, data):  # noqa: N802
        self.transport.write(data)


class RealSocketTests(TestCase):
    """The direct path on real loopback sockets."""

    def connect(self, port: int) -> tuple[Outcome, Deferred, object]:
        outcome = Outcome()
        done: Deferred = Deferred()

        def connected(end):
            outcome.on_connected(end)
            done.callback(end)

        def failed(failure):
            outcome.on_failed(failure)
            done.callback(None)

        endpoint = local_tcp_endpoint(reactor, 5)("127.0.0.1", port)
        cancel = connect_relay(endpoint, connected, failed)
        return outcome, done, cancel

    async def test_connects_and_relays(self):
        """The local end is connected to the service and reads its bytes."""
        port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        outcome, done, _ = self.connect(port.getHost().port)
        end = await done
        self.assertEqual(outcome.failed, [])
        self.assertIs(end.transport.protocol, end)  # no wrapping protocol
        # Not spliced yet: what the service sends is held for the stream.
        end.transport.write(b"ping")
        for _ in range(200):
            if end._held:
                break
            d: Deferred = Deferred()
            reactor.callLater(0.01, d.callback, None)
            await d
        self.assertEqual(b"".join(end._held), b"ping")
        closed: Deferred = Deferred()
        end.on_close = lambda reason: closed.callback(reason.value)
        end.transport.loseConnection()
        await closed

    async def test_refused(self):
        """A closed port fails with the refusal, never connected."""
        port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        outcome, done, _ = self.connect(number)
        await done
        self.assertEqual(outcome.connected, [])
        [failure] = outcome.failed
        self.assertTrue(failure.check(ConnectionRefusedError))

    async def test_cancelled(self):
        """Cancelling before the connection is made fails it (UserError)."""
        port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        outcome, done, cancel = self.connect(port.getHost().port)
        cancel()
        await done
        self.assertEqual(outcome.connected, [])
        [failure] = outcome.failed
        self.assertTrue(failure.check(UserError))
