"""Corking: the frames of one burst go to the transport as one write."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.frontendkit import Gateway, entry
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.testing import Collector, Frame, decode_frames
from threshold.wire import frames as F


class CountingTransport(StringTransport):
    """Counts the calls that reach the transport (one TLS record each)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def write(self, data: bytes) -> None:
        self.calls += 1
        super().write(data)

    def writeSequence(self, seq) -> None:  # noqa: N802
        self.calls += 1
        StringTransport.write(self, b"".join(seq))


def session(client: bool = True, accept=None) -> tuple[MuxSession, CountingTransport]:
    s = MuxSession(
        client=client,
        clock=Clock(),
        handler=StreamAcceptor(accept or (lambda stream: Collector())),
        config=SessionConfig(keepalive_interval=0),
    )
    transport = CountingTransport()
    s.makeConnection(transport)
    return s, transport


def frames(transport: StringTransport) -> list[tuple[int, int, int, int]]:
    return [
        (f.type, f.flags, f.stream_id, f.length)
        for f in decode_frames(transport.value())
    ]


class CorkTests(SynchronousTestCase):
    def test_writes_held_until_uncork(self):
        """Corked frames are written once, in order, at the outermost uncork."""
        s, transport = session()
        s.cork()
        s.cork()
        stream = s.open_stream(Collector())
        stream.write(b"hello")
        stream.loseWriteConnection()
        s.uncork()
        self.assertEqual((transport.calls, transport.value()), (0, b""))
        s.uncork()
        self.assertEqual(transport.calls, 1)
        self.assertEqual(
            frames(transport),
            [
                (F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0),
                (F.TYPE_DATA, 0, 1, 5),
                (F.TYPE_WINDOW_UPDATE, F.FLAG_FIN, 1, 0),
            ],
        )

    def test_uncorked_writes_at_once(self):
        """Without a cork every frame is written when it is made (as before)."""
        s, transport = session()
        stream = s.open_stream(Collector())
        self.assertEqual(transport.calls, 1)
        stream.write(b"x")
        self.assertEqual(transport.calls, 2)

    def test_slice_answers_in_one_write(self):
        """What acting on one read writes (ACKs, a Ping answer) is one write."""
        s, transport = session(client=False)
        transport.clear()
        transport.calls = 0
        data = b"".join(
            F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, sid, 0)
            for sid in (1, 3, 5)
        ) + F.encode_header(F.TYPE_PING, F.FLAG_SYN, 0, 9)
        s.dataReceived(data)
        self.assertEqual(transport.calls, 1)
        self.assertEqual(
            frames(transport),
            [
                (F.TYPE_WINDOW_UPDATE, F.FLAG_ACK, 1, 0),
                (F.TYPE_WINDOW_UPDATE, F.FLAG_ACK, 3, 0),
                (F.TYPE_WINDOW_UPDATE, F.FLAG_ACK, 5, 0),
                (F.TYPE_PING, F.FLAG_ACK, 0, 9),
            ],
        )

    def test_go_away_flushed_before_close(self):
        """A protocol error's Go Away, held by the slice's cork, is written
        before the transport is closed."""
        s, transport = session(client=False)
        transport.clear()
        s.dataReceived(F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2, 0))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(
            frames(transport)[-1],
            (F.TYPE_GO_AWAY, 0, 0, F.GO_AWAY_PROTOCOL_ERROR),
        )

    def test_dropped_after_connection_lost(self):
        """Frames held when the connection is lost are not written."""
        s, transport = session()
        s.cork()
        s.open_stream(Collector())
        s.connectionLost()
        s.uncork()
        self.assertEqual(transport.value(), b"")

    def test_exception_in_slice_still_uncorks(self):
        """A handler that raises still leaves the session uncorked."""

        def boom(stream):
            raise RuntimeError("handler bug")

        s, transport = session(client=False, accept=boom)
        self.flushLoggedErrors(RuntimeError)
        s.dataReceived(F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0))
        self.flushLoggedErrors(RuntimeError)
        before = transport.calls
        s.open_stream(Collector())
        self.assertEqual(transport.calls, before + 1)


class FrontendOpeningTests(SynchronousTestCase):
    def test_syn_and_opening_bytes_one_write(self):
        """A routed user's SYN, header and first bytes: one transport write."""
        gateway = Gateway([entry()])
        session = gateway.session
        calls = []
        write = session.transport.write

        def recording(data: bytes) -> None:
            calls.append(data)
            write(data)

        session.transport.write = recording
        session.transport.writeSequence = lambda seq: recording(b"".join(seq))
        gateway.connect(sent=b"")
        self.assertEqual(len(calls), 1)
        [syn, data] = decode_frames(calls[0])
        self.assertEqual((syn.type, syn.flags), (F.TYPE_WINDOW_UPDATE, F.FLAG_SYN))
        self.assertEqual(
            data, Frame(F.TYPE_DATA, 0, syn.stream_id, 18, b'{"service":"web"}\n')
        )


class WidenBufferTests(SynchronousTestCase):
    def test_session_widens_its_tcp_buffer(self):
        """The TCP under a session (under TLS too) buffers 1 MiB before it
        pauses the session; a transport without a buffer size is left alone."""
        from threshold.mux.writer import SESSION_TCP_BUFFER

        class Tcp(StringTransport):
            bufferSize = 65536

        class Tls(StringTransport):
            def __init__(self) -> None:
                super().__init__()
                self.transport = Tcp()

        for outer in (Tcp(), Tls()):
            s = MuxSession(
                client=True,
                clock=Clock(),
                handler=StreamAcceptor(lambda stream: Collector()),
                config=SessionConfig(keepalive_interval=0),
            )
            s.makeConnection(outer)
            tcp = getattr(outer, "transport", outer)
            self.assertEqual(tcp.bufferSize, SESSION_TCP_BUFFER)
        _, plain = session()
        self.assertNotIn("bufferSize", vars(plain))
