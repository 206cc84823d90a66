"""The client's service streams in memory: header, lookup, held bytes, resets."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.clientkit import FakeEndpoint, connect, make_settings
from threshold.client.endpoints import local_tcp_endpoint
from threshold.client.streams import ServiceStream
from threshold.mux.stream import StreamReset
from threshold.relay import RelayState
from threshold.testing import Collector
from threshold.wire.handshake import encode_stream_header


class ServiceStreamTests(SynchronousTestCase):
    def test_unknown_service_reset(self):
        """A stream naming an unknown service is reset; nothing connects."""
        endpoint = FakeEndpoint()
        c = connect(endpoint)
        user = Collector()
        stream = c.server.open_stream(user)
        stream.write(encode_stream_header("nope"))
        c.pump.flush()
        user.lost.trap(StreamReset)
        self.assertEqual(endpoint.connects, [])
        self.assertEqual(c.settings.stats.unknown_service, 1)

    def test_bad_header_reset(self):
        """A stream that does not start with a header line is reset."""
        c = connect()
        user = Collector()
        c.server.open_stream(user).write(b"GET / HTTP/1.1\r\n\r\n")
        c.pump.flush()
        user.lost.trap(StreamReset)

    def test_eof_before_header_closes(self):
        """A stream that ends before its header line is closed, not reset."""
        endpoint = FakeEndpoint()
        c = connect(endpoint)
        user = Collector()
        stream = c.server.open_stream(user)
        stream.write(b'{"service": ')
        stream.loseWriteConnection()
        c.pump.flush()
        self.assertTrue(user.read_closed)
        self.assertEqual(endpoint.connects, [])

    def test_header_in_pieces(self):
        """A header that arrives a byte at a time is read whole."""
        endpoint = FakeEndpoint()
        c = connect(endpoint)
        stream = c.server.open_stream(Collector())
        for byte in encode_stream_header("web") + b"hi":
            stream.write(bytes([byte]))
            c.pump.flush()
        endpoint.finish()
        c.pump.flush()
        self.assertEqual(endpoint.connects, [("127.0.0.1", 8080)])
        self.assertEqual(endpoint.transport.value(), b"hi")

    def test_local_connect_failure_reset(self):
        """A local service that refuses resets the stream."""
        endpoint = FakeEndpoint(fail(ConnectionRefusedError("down")))
        c = connect(endpoint)
        user = Collector()
        c.server.open_stream(user).write(encode_stream_header("web"))
        c.pump.flush()
        user.lost.trap(StreamReset)
        self.assertEqual(c.settings.stats.local_failures, 1)

    def test_bytes_held_until_connected(self):
        """Bytes sent before the local connection is up arrive after, in order."""
        endpoint = FakeEndpoint()
        c = connect(endpoint)
        user = Collector()
        stream = c.server.open_stream(user)
        stream.write(encode_stream_header("web") + b"first ")
        c.pump.flush()
        stream.write(b"second")
        c.pump.flush()
        self.assertEqual(endpoint.connects, [("127.0.0.1", 8080)])
        self.assertEqual(endpoint.transport.value(), b"")
        local = endpoint.finish()
        c.pump.flush()
        self.assertEqual(endpoint.transport.value(), b"first second")
        local.dataReceived(b"answer")
        c.pump.flush()
        self.assertEqual(user.data, b"answer")

    def test_map_in_force_when_header_arrives(self):
        """A stream uses the service map in force when its header arrives."""
        endpoint = FakeEndpoint()
        c = connect(endpoint)
        c.settings.services = {"web": ("127.0.0.2", 81)}
        c.server.open_stream(Collector()).write(encode_stream_header("web"))
        c.pump.flush()
        self.assertEqual(endpoint.connects, [("127.0.0.2", 81)])

    def test_fin_before_connected_is_passed_on(self):
        """A request and its FIN sent before the service is up both arrive."""
        endpoint = FakeEndpoint()
        c = connect(endpoint)
        stream = c.server.open_stream(Collector())
        stream.write(encode_stream_header("web") + b"request")
        stream.loseWriteConnection()
        c.pump.flush()
        self.assertFalse(endpoint.transport.disconnecting)
        endpoint.finish()
        c.pump.flush()
        self.assertEqual(endpoint.transport.value(), b"request")
        # StringTransport has no half-close: the relay closes it instead.
        self.assertTrue(endpoint.transport.disconnecting)

    def test_stream_reset_while_connecting(self):
        """A stream reset while its service connects cancels the attempt quietly."""
        endpoint = FakeEndpoint()
        c = connect(endpoint)
        stream = c.server.open_stream(Collector())
        stream.write(encode_stream_header("web"))
        c.pump.flush()
        factory, pending = endpoint.pending
        stream.abortConnection()
        c.pump.flush()
        # Cancelled, and the cancellation handled (no failure left over).
        self.assertIsNone(self.successResultOf(pending))
        self.assertEqual(c.settings.stats.local_failures, 0)

    def test_stream_reset_while_endpoint_connects(self):
        """A cancelled real endpoint (ConnectingCancelledError) is no failure."""

        def cancelled(d):
            d.errback(ConnectingCancelledError(None))

        endpoint = FakeEndpoint(Deferred(cancelled))
        c = connect(endpoint)
        stream = c.server.open_stream(Collector())
        stream.write(encode_stream_header("web"))
        c.pump.flush()
        stream.abortConnection()
        c.pump.flush()
        self.assertIsNone(self.successResultOf(endpoint.result))
        self.assertEqual(c.settings.stats.local_failures, 0)

    def test_local_connection_is_quiet(self):
        """The local connection's factory logs no start and stop lines."""
        endpoint = FakeEndpoint()
        c = connect(endpoint)
        c.server.open_stream(Collector()).write(encode_stream_header("web"))
        c.pump.flush()
        factory, _ = endpoint.pending
        self.assertFalse(factory.noisy)

    def test_connection_lost_default(self):
        """connectionLost() without a reason ends the stream cleanly (a Failure)."""
        stream = ServiceStream(make_settings())
        transport = StringTransport()
        transport.id = 3
        stream.makeConnection(transport)
        stream.connectionLost()
        self.assertIs(stream.state, RelayState.CLOSED)


class LocalEndpointTests(SynchronousTestCase):
    def test_addresses_connect_directly(self):
        """IP addresses get plain TCP endpoints; only names are resolved."""
        make = local_tcp_endpoint(MemoryReactorClock(), 5)
        self.assertIsInstance(make("127.0.0.1", 80), TCP4ClientEndpoint)
        self.assertIsInstance(make("::1", 80), TCP6ClientEndpoint)
        self.assertIsInstance(make("localhost", 80), HostnameEndpoint)
