"""write_at_once: TCP writes go to the socket at once, in order, on real sockets."""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from threshold.relay import tune_transport, write_at_once


class Sink(Protocol):
    """Collects what arrives; ``done`` fires with it at the close."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason=None) -> None:  # noqa: N802
        self.done.callback(bytes(self.data))


class Pair:
    """A listening Sink and a connected client protocol."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.sink = Sink()
        self.port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: self.sink), interface="127.0.0.1"
        )
        test.addCleanup(self.port.stopListening)

    async def connect(self) -> Protocol:
        made: Deferred = Deferred()

        class Client(Protocol):
            def connectionMade(self):  # noqa: N802
                made.callback(self)

        factory = ClientFactory.forProtocol(Client)
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        client = await made
        return client


def pending(connection) -> int:
    return len(connection.dataBuffer) - connection.offset + connection._tempDataLen


class WriteAtOnceTests(TestCase):
    async def test_sent_without_the_reactor(self):
        """With nothing buffered a write reaches the socket before it returns."""
        pair = Pair(self)
        client = await pair.connect()
        write_at_once(client.transport)
        client.transport.write(b"now")
        self.assertEqual(pending(client.transport), 0)
        self.assertNotIn(client.transport, reactor.getWriters())
        client.transport.loseConnection()
        self.assertEqual(await pair.sink.done, b"now")

    async def test_large_writes_buffered(self):
        """A write of 4 KiB or more takes Twisted's buffer."""
        pair = Pair(self)
        client = await pair.connect()
        write_at_once(client.transport)
        client.transport.write(b"x" * 4095)
        self.assertEqual(pending(client.transport), 0)
        client.transport.write(b"y" * 4096)
        self.assertEqual(pending(client.transport), 4096)
        client.transport.write(b"tail")  # queued behind it
        self.assertEqual(pending(client.transport), 4100)
        client.transport.loseConnection()
        expected = b"x" * 4095 + b"y" * 4096 + b"tail"
        self.assertEqual(await pair.sink.done, expected)

    async def test_order_kept_behind_buffered_bytes(self):
        """Bytes already buffered by Twisted go first; later ones queue behind."""
        pair = Pair(self)
        client = await pair.connect()
        transport = client.transport
        write_at_once(transport)
        transport.writeSequence([b"first,"])  # buffered, Twisted's path
        transport.write(b"second,")
        self.assertEqual(pending(transport), len(b"first,second,"))
        transport.write(b"third")
        transport.loseConnection()
        self.assertEqual(await pair.sink.done, b"first,second,third")

    async def test_partial_send_rest_buffered(self):
        """What the socket does not take is buffered and follows, in order."""
        pair = Pair(self)
        client = await pair.connect()
        transport = client.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        write_at_once(transport)
        pair.sink.transport.pauseProducing()  # the peer stops reading
        blob = os.urandom(1 << 20)
        chunks = [blob[i : i + 4000] for i in range(0, len(blob), 4000)]
        for chunk in chunks:
            transport.write(chunk)
        self.assertGreater(pending(transport), 0)
        pair.sink.transport.resumeProducing()
        transport.loseConnection()
        self.assertEqual(await pair.sink.done, blob)

    async def test_after_lose_connection_twisted_path(self):
        """After loseConnection a write takes Twisted's path (dropped as before)."""
        pair = Pair(self)
        client = await pair.connect()
        transport = client.transport
        write_at_once(transport)
        transport.write(b"kept")
        transport.loseConnection()
        transport.write(b"more")  # Twisted buffers it behind the close
        data = await pair.sink.done
        self.assertTrue(data.startswith(b"kept"))

    async def test_tune_transport_installs_it(self):
        """tune_transport sets TCP_NODELAY and the direct write on TCP only."""
        pair = Pair(self)
        client = await pair.connect()
        tune_transport(client.transport)
        self.assertIn("write", vars(client.transport))
        self.assertTrue(client.transport.getTcpNoDelay())
        other = StringTransport()
        tune_transport(other)
        self.assertNotIn("write", vars(other))
        client.transport.loseConnection()
        await pair.sink.done


class WidenBufferRealTests(TestCase):
    async def test_sessions_share_the_read_buffer_safely(self):
        """widen_buffer on real TCP connections: 1 MiB before pausing, reads
        through the one shared buffer, and two connections read at the same
        time each get exactly their own bytes."""
        from threshold.mux.writer import SESSION_TCP_BUFFER, widen_buffer

        readers: list[Protocol] = []
        done: list[Deferred] = [Deferred(), Deferred()]

        class Reader(Protocol):
            def connectionMade(self):  # noqa: N802
                widen_buffer(self.transport)
                self.size = self.transport.bufferSize
                self.got = bytearray()
                self.done = done[len(readers)]
                readers.append(self)

            def dataReceived(self, data):  # noqa: N802
                self.got += data

            def connectionLost(self, reason=None):  # noqa: N802
                self.done.callback(bytes(self.got))

        port = reactor.listenTCP(0, Factory.forProtocol(Reader), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        senders = []
        for _ in range(2):
            made: Deferred = Deferred()

            class Sender(Protocol):
                def connectionMade(self, made=made):  # noqa: N802
                    made.callback(self)

            factory = ClientFactory.forProtocol(Sender)
            reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
            senders.append(await made)
        blobs = [os.urandom(2 << 20), os.urandom(2 << 20)]
        for sender, blob in zip(senders, blobs, strict=True):
            sender.transport.write(blob)
            sender.transport.loseConnection()
        received = [await d for d in done]
        self.assertEqual([r.size for r in readers], [SESSION_TCP_BUFFER] * 2)
        by_reader = {id(r): data for r, data in zip(readers, received, strict=True)}
        self.assertEqual(sorted(by_reader.values()), sorted(blobs))
