"""The client's session in memory: hello, service lookup, held bytes."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from threshold.client.service import TunnelClient
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.mux.stream import StreamReset
from threshold.testing import Collector
from threshold.wire.handshake import (
    LineBuffer,
    encode_hello_reply,
    encode_stream_header,
    parse_hello,
)


class HelloAnswer(Collector):
    """Stream 1 on a fake server: answer the hello with ``reply``."""

    def __init__(self, reply: bytes, seen: list) -> None:
        super().__init__()
        self.reply = reply
        self.seen = seen
        self.buffer = LineBuffer()

    def dataReceived(self, data):  # noqa: N802
        line, _ = self.buffer.feed(data)
        if line is not None:
            self.seen.append(parse_hello(line))
            self.transport.write(self.reply)


class FakeEndpoint:
    """A local endpoint whose connection the test completes or fails."""

    def __init__(self, result: Deferred | None = None) -> None:
        self.result = result
        self.transport = StringTransport()
        self.connects: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> FakeEndpoint:
        self.connects.append((host, port))
        return self

    def connect(self, factory):
        if self.result is not None:
            return self.result
        d = Deferred()
        self.pending = (factory, d)
        return d

    def finish(self):
        factory, d = self.pending
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(self.transport)
        d.callback(protocol)
        return protocol


def connect(endpoint: FakeEndpoint, reply: bytes = encode_hello_reply(True)):
    clock = Clock()
    tunnel = TunnelClient(
        "TestClient1",
        {"web": ("127.0.0.1", 8080)},
        "server:9056",
        clock,
        endpoint,
        SessionConfig(keepalive_interval=0),
    )
    seen: list = []
    client, server, pump = iosim.connectedServerAndClient(
        lambda: MuxSession(
            client=False,
            clock=clock,
            handler=StreamAcceptor(lambda s: HelloAnswer(reply, seen)),
            config=SessionConfig(keepalive_interval=0),
        ),
        lambda: tunnel.factory().buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return tunnel, client, server, pump, seen


class ClientTests(SynchronousTestCase):
    def test_hello_sent_and_accepted(self):
        """The client says hello with its id and is accepted."""
        tunnel, client, server, pump, seen = connect(FakeEndpoint())
        self.assertEqual([h.client_id for h in seen], ["TestClient1"])
        self.assertTrue(client.accepted)
        self.assertEqual(tunnel.refusals, 0)

    def test_hello_refused(self):
        """A refused hello closes the session and counts for backoff."""
        tunnel, client, server, pump, seen = connect(
            FakeEndpoint(), encode_hello_reply(False, "nope")
        )
        self.assertFalse(client.accepted)
        self.assertTrue(client.closed)
        self.assertEqual(tunnel.refusals, 1)

    def test_unknown_service_reset(self):
        """A stream naming an unknown service is reset; nothing connects."""
        endpoint = FakeEndpoint()
        tunnel, client, server, pump, seen = connect(endpoint)
        user = Collector()
        stream = server.open_stream(user)
        stream.write(encode_stream_header("nope"))
        pump.flush()
        user.lost.trap(StreamReset)
        self.assertEqual(endpoint.connects, [])
        self.assertEqual(tunnel.unknown_service, 1)

    def test_bad_header_reset(self):
        """A stream that does not start with a header line is reset."""
        tunnel, client, server, pump, seen = connect(FakeEndpoint())
        user = Collector()
        server.open_stream(user).write(b"GET / HTTP/1.1\r\n\r\n")
        pump.flush()
        user.lost.trap(StreamReset)

    def test_local_connect_failure_reset(self):
        """A local service that refuses resets the stream."""
        endpoint = FakeEndpoint(fail(ConnectionRefusedError("down")))
        tunnel, client, server, pump, seen = connect(endpoint)
        user = Collector()
        server.open_stream(user).write(encode_stream_header("web"))
        pump.flush()
        user.lost.trap(StreamReset)
        self.assertEqual(tunnel.local_failures, 1)

    def test_bytes_held_until_connected(self):
        """Bytes sent before the local connection is up arrive after, in order."""
        endpoint = FakeEndpoint()
        tunnel, client, server, pump, seen = connect(endpoint)
        user = Collector()
        stream = server.open_stream(user)
        stream.write(encode_stream_header("web") + b"first ")
        pump.flush()
        stream.write(b"second")
        pump.flush()
        self.assertEqual(endpoint.connects, [("127.0.0.1", 8080)])
        self.assertEqual(endpoint.transport.value(), b"")
        local = endpoint.finish()
        pump.flush()
        self.assertEqual(endpoint.transport.value(), b"first second")
        local.dataReceived(b"answer")
        pump.flush()
        self.assertEqual(user.data, b"answer")

    def test_stream_from_server_before_hello_refused(self):
        """Streams opened before the hello is accepted are refused."""
        tunnel, client, server, pump, seen = connect(
            FakeEndpoint(), encode_hello_reply(False, "nope")
        )
        self.assertEqual(client.streams_accepted, 0)

    def test_fin_before_connected_is_passed_on(self):
        """A request and its FIN sent before the service is up both arrive."""
        endpoint = FakeEndpoint()
        tunnel, client, server, pump, seen = connect(endpoint)
        stream = server.open_stream(Collector())
        stream.write(encode_stream_header("web") + b"request")
        stream.loseWriteConnection()
        pump.flush()
        self.assertFalse(endpoint.transport.disconnecting)
        endpoint.finish()
        pump.flush()
        self.assertEqual(endpoint.transport.value(), b"request")
        # StringTransport has no half-close: the relay closes it instead.
        self.assertTrue(endpoint.transport.disconnecting)


class LocalEndpointTests(SynchronousTestCase):
    def test_addresses_connect_directly(self):
        """IP addresses get plain TCP endpoints; only names are resolved."""
        from twisted.internet.endpoints import (
            HostnameEndpoint,
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
        )
        from twisted.internet.testing import MemoryReactorClock

        from threshold.client.service import local_tcp_endpoint

        make = local_tcp_endpoint(MemoryReactorClock(), 5)
        self.assertIsInstance(make("127.0.0.1", 80), TCP4ClientEndpoint)
        self.assertIsInstance(make("::1", 80), TCP6ClientEndpoint)
        self.assertIsInstance(make("localhost", 80), HostnameEndpoint)


class CancelTests(SynchronousTestCase):
    def test_stream_reset_while_connecting(self):
        """A stream reset while its service connects cancels the attempt quietly."""
        endpoint = FakeEndpoint()
        tunnel, client, server, pump, seen = connect(endpoint)
        stream = server.open_stream(Collector())
        stream.write(encode_stream_header("web"))
        pump.flush()
        factory, pending = endpoint.pending
        stream.abortConnection()
        pump.flush()
        # Cancelled, and the cancellation handled (no failure left over).
        self.assertIsNone(self.successResultOf(pending))
        self.assertEqual(tunnel.local_failures, 0)


class HelloTimeoutTests(SynchronousTestCase):
    def test_silent_server_gives_up(self):
        """No answer to the hello within the timeout closes and counts a refusal."""
        tunnel, client, server, pump, seen = connect(FakeEndpoint(), reply=b"")
        self.assertEqual([h.client_id for h in seen], ["TestClient1"])
        tunnel.clock.advance(tunnel.hello_timeout - 0.1)
        pump.flush()
        self.assertFalse(client.closed)
        tunnel.clock.advance(0.2)
        pump.flush()
        self.assertTrue(client.closed)
        self.assertFalse(client.accepted)
        self.assertEqual(tunnel.refusals, 1)
