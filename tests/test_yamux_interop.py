"""Interoperability of our yamux session with yamux-js, an independent one.

yamux-js (npm) is a Node.js port of hashicorp/yamux. ``tests/interop/
yamux_peer.js`` runs it as a subprocess listening on loopback; our
:class:`MuxSession` connects over real TCP and the two exchange streams in
both directions, with more than one 256 KiB window per stream so Window
Updates must flow both ways, plus half-close, Ping and Go Away.

What yamux-js 0.2.0 cannot do, and so is not tested here: it drops the part
of a frame that a socket read splits off (the peer script reassembles whole
frames before yamux-js sees them, except in :class:`RawPeerTests`), and it
never reports a FIN or RST it receives to its user (``Stream.processFlags``
compares the flags with SYN where it means FIN, and no stream's readable
side is ever ended), so our FIN cannot be observed on its side.

Skipped unless ``node`` is on PATH and yamux-js is installed with
``npm ci --prefix tests/interop``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.components import missing
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import (
    INITIAL_WINDOW,
    GoAwayReceived,
    MuxSession,
    SessionConfig,
)
from threshold.mux.stream import Stream
from threshold.testing import Collector
from threshold.wire.frames import FLAG_SYN

INTEROP = Path(__file__).parent / "interop"
PEER_SCRIPT = INTEROP / "yamux_peer.js"
YAMUX_JS = INTEROP / "node_modules" / "yamux-js" / "package.json"
INSTALL = "npm ci --prefix tests/interop"

#: Seconds any single step may take before the test fails.
STEP = 5.0

log = Logger()


def skip_reason() -> str | None:
    """Why the interop tests cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not on PATH (needed to run the yamux-js peer)"
    if not YAMUX_JS.exists():
        return f"yamux-js is not installed in tests/interop; run: {INSTALL}"
    return None


def pattern(seed: str, size: int) -> bytes:
    """The peer's pseudo-random bytes: SHA-256 of ``seed:i``, concatenated."""
    blocks = (
        hashlib.sha256(f"{seed}:{i}".encode()).digest()
        for i in range((size + 31) // 32)
    )
    return b"".join(blocks)[:size]


def command(op: str, **fields: object) -> bytes:
    """The first line of a stream: what the peer should do with it."""
    return json.dumps({"op": op, **fields}).encode() + b"\n"


def lines(data: bytes) -> list[dict]:
    """Decode the peer's JSON lines."""
    return [json.loads(line) for line in data.splitlines() if line]


class PeerProcess(ProcessProtocol):
    """The Node peer: its port once listening, its stderr, its end."""

    def __init__(self) -> None:
        self.port: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.stdout = b""
        self.stderr = b""
        self.running = True

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.stdout += data
        if not self.port.called and b"\n" in self.stdout:
            first = self.stdout.split(b"\n", 1)[0]
            self.port.callback(json.loads(first)["port"])

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.running = False
        if not self.port.called:
            self.port.errback(
                RuntimeError(
                    f"yamux peer exited before listening: {reason.value}; "
                    f"stderr: {self.stderr.decode(errors='replace')}"
                )
            )
        self.ended.callback(None)


class Receiver(Collector):
    """Collects a stream; ``done`` fires when the peer's FIN arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.done: Deferred[bytes] = Deferred()

    def readConnectionLost(self) -> None:  # noqa: N802
        super().readConnectionLost()
        if not self.done.called:
            self.done.callback(self.data)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        super().connectionLost(reason)
        if not self.done.called:
            self.done.errback(reason)


class EchoRecorder(Receiver):
    """Echoes and keeps what it got; half-closes back on the peer's FIN."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        super().dataReceived(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        super().readConnectionLost()
        self.transport.loseWriteConnection()


class CountingSession(MuxSession):
    """A session that counts the Pings the peer sends (SYN)."""

    pings_received = 0

    def ping_received(self, flags: int, value: int) -> None:
        if flags & FLAG_SYN:
            self.pings_received += 1
        super().ping_received(flags, value)


def wait(d: Deferred, seconds: float = STEP) -> Deferred:
    """``d`` with a bound on how long it may take."""
    return d.addTimeout(seconds, reactor)


class PeerHarness:
    """Starts a yamux-js peer in the role ``node_role`` and connects to it."""

    node_role = "server"
    raw = False
    timeout = 30

    def setUp(self) -> None:
        reason = skip_reason()
        if reason is not None:
            raise missing(reason)
        self.accepted: list[tuple[Stream, Receiver]] = []
        self.accept = self.accept_receiver

    def accept_receiver(self, stream: Stream) -> Receiver:
        """Accept a stream the peer opens with a :class:`Receiver`."""
        protocol = Receiver()
        self.accepted.append((stream, protocol))
        return protocol

    def accept_echo(self, stream: Stream) -> EchoRecorder:
        """Accept a stream the peer opens with an :class:`EchoRecorder`."""
        protocol = EchoRecorder()
        self.accepted.append((stream, protocol))
        return protocol

    @inlineCallbacks
    def start(self, *peer_args: str):
        """Start the peer, connect a session to it, return the session."""
        args = [str(PEER_SCRIPT), "--role", self.node_role, *peer_args]
        if self.raw:
            args.append("--raw")
        peer = PeerProcess()
        node = shutil.which("node")
        reactor.spawnProcess(peer, node, [node, *args], env=os.environ)
        self.addCleanup(self._stop_peer, peer)
        port = yield wait(peer.port)
        session = CountingSession(
            # We dial; our yamux role is the other one than the peer's.
            client=self.node_role == "server",
            clock=reactor,
            handler=StreamAcceptor(lambda stream: self.accept(stream)),
            config=SessionConfig(),
            name="interop",
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=STEP)
        yield wait(connectProtocol(endpoint, session))
        self.addCleanup(self._stop_session, session)
        return session

    @inlineCallbacks
    def _stop_session(self, session: MuxSession):
        if session.closed:
            return
        closed = session.when_closed()
        session.go_away()
        if not session.closed:
            session.transport.loseConnection()
        yield wait(closed)

    @inlineCallbacks
    def _stop_peer(self, peer: PeerProcess):
        if peer.running:
            peer.transport.signalProcess("KILL")
        yield wait(peer.ended)
        log.info(
            "yamux peer stderr:\n{stderr}",
            stderr=peer.stderr.decode(errors="replace"),
        )

    @inlineCallbacks
    def echo(self, session: MuxSession, payload: bytes, chunk: int = 100_000):
        """Have the peer echo ``payload`` on a new stream.

        Returns (stream, receiver, what came back before the peer's FIN).
        """
        receiver = Receiver()
        stream = session.open_stream(receiver)
        stream.write(command("echo", size=len(payload)))
        for offset in range(0, len(payload), chunk):
            stream.write(payload[offset : offset + chunk])
        got = yield wait(receiver.done)
        return stream, receiver, got


class BothRolesTests(PeerHarness):
    """Tests run with yamux-js in either role."""

    @inlineCallbacks
    def test_echo_concurrent_streams_past_the_window(self):
        """Several concurrent streams, each carrying more than a 256 KiB
        window both ways, come back byte for byte, then the peer's FIN;
        after our FIN each stream ends cleanly on our side."""
        session = yield self.start()
        sizes = [INITIAL_WINDOW + 1, 300_000, 700_000, 1_100_000]
        payloads = [os.urandom(size) for size in sizes]
        results = yield wait(
            _gather([self.echo(session, payload) for payload in payloads]),
            3 * STEP,
        )
        for payload, (stream, receiver, got) in zip(payloads, results, strict=True):
            self.assertEqual(len(got), len(payload))
            self.assertTrue(got == payload, f"stream {stream.id}: echo differs")
            # More than one window went each way, so yamux-js granted window
            # (we never send past it) and accepted ours (it would stall).
            self.assertGreater(stream.bytes_sent, INITIAL_WINDOW)
            self.assertGreater(stream.bytes_received, INITIAL_WINDOW)
            self.assertEqual(stream.id % 2, 1 if session.client else 0)
            stream.loseWriteConnection()
            self.assertIsNotNone(receiver.lost)
            receiver.lost.trap(ConnectionDone)
        self.assertEqual(session.streams, {})

    @inlineCallbacks
    def test_peer_opens_streams(self):
        """Streams opened by yamux-js arrive with the peer's parity and all
        their bytes and FIN; our echo (and our FIN) gets back to it intact."""
        session = yield self.start()
        self.accept = self.accept_echo
        size = 400_000
        control = Receiver()
        stream = session.open_stream(control)
        stream.write(command("open", count=3, size=size))
        answer = yield wait(control.done, 3 * STEP)
        results = [r for r in lines(answer) if r["op"] == "result"]
        self.assertEqual(lines(answer)[-1], {"op": "done"})
        self.assertEqual(len(results), 3)
        self.assertEqual(len(self.accepted), 3)
        for accepted, protocol in self.accepted:
            self.assertEqual(accepted.id % 2, 0 if session.client else 1)
            yield protocol.done
            self.assertTrue(protocol.read_closed)
            self.assertTrue(
                protocol.data == pattern(str(accepted.id), size),
                f"stream {accepted.id}: bytes differ from what the peer sent",
            )
        for result in results:
            self.assertEqual(result["bytes"], size)
            self.assertEqual(result["echoed"], result["sent"])
        self.assertEqual(
            sorted(r["stream"] for r in results),
            sorted(s.id for s, _ in self.accepted),
        )

    @inlineCallbacks
    def test_half_close_by_peer_keeps_our_direction_open(self):
        """After yamux-js half-closes (FIN) a stream, the other direction
        still carries data: the peer reports every byte we sent after it."""
        session = yield self.start()
        receiver = Receiver()
        stream = session.open_stream(receiver)
        stream.write(command("sink", size=600_000))
        got = yield wait(receiver.done)
        self.assertEqual(got, b"")
        self.assertFalse(stream.closed)
        payload = os.urandom(600_000)
        stream.write(payload)
        stream.loseWriteConnection()
        yield wait(_until(lambda: self.accepted and self.accepted[0][1].read_closed))
        (report,) = lines(self.accepted[0][1].data)
        self.assertEqual(
            report,
            {
                "op": "report",
                "of": stream.id,
                "bytes": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            },
        )


class NodeServerTests(BothRolesTests, TestCase):
    """yamux-js as the accepting side (even ids); we dial (odd ids)."""

    node_role = "server"

    @inlineCallbacks
    def test_ping_both_ways(self):
        """yamux-js answers our Ping (we learn the RTT) and we answer its
        Pings, so its keepalive never ends the session."""
        session = yield self.start("--keepalive", "0.05", "--write-timeout", "0.3")
        yield wait(_until(lambda: session.rtt is not None))
        self.assertGreater(session.rtt, 0)
        # Several of its Pings, each of which had to be answered within 0.3s.
        yield wait(_until(lambda: session.pings_received >= 8))
        self.assertFalse(session.closed)
        _, _, got = yield self.echo(session, b"still here")
        self.assertEqual(got, b"still here")

    @inlineCallbacks
    def test_go_away_from_peer(self):
        """yamux-js's Go Away (normal) ends our session with that code."""
        session = yield self.start()
        receiver = Receiver()
        stream = session.open_stream(receiver)
        stream.write(command("goaway"))
        reason = yield wait(session.when_closed())
        self.assertIsInstance(reason, GoAwayReceived)
        self.assertEqual(reason.code, 0)
        # The stream still open when the session ended ends with it.
        yield self.assertFailure(receiver.done, GoAwayReceived)

    @inlineCallbacks
    def test_reset_then_more_streams(self):
        """yamux-js takes our RST without ending the session: streams opened
        after a reset still work."""
        session = yield self.start()
        receiver = Receiver()
        stream = session.open_stream(receiver)
        stream.write(command("echo", size=1_000_000))
        stream.write(os.urandom(100_000))
        stream.abortConnection()
        self.assertTrue(stream.closed)
        yield self.assertFailure(receiver.done, ConnectionAborted)
        payload = os.urandom(300_000)
        _, _, got = yield self.echo(session, payload)
        self.assertTrue(got == payload, "echo after a reset differs")


class NodeClientTests(BothRolesTests, TestCase):
    """yamux-js as the dialing side (odd ids); we accept (even ids)."""

    node_role = "client"


class RawPeerTests(PeerHarness, TestCase):
    """yamux-js unaided: no reassembly of frames split by socket reads."""

    raw = True

    @inlineCallbacks
    def test_small_messages_one_at_a_time(self):
        """Small frames, one exchange at a time (each fits in one socket
        read), interoperate with the unmodified yamux-js."""
        session = yield self.start()
        for i in range(10):
            payload = os.urandom(500 + i * 100)
            _, _, got = yield self.echo(session, payload)
            self.assertEqual(got, payload)


def _gather(ds: list[Deferred]) -> Deferred:
    return gatherResults(ds, consumeErrors=True)


@inlineCallbacks
def _until(predicate, interval: float = 0.01):
    """Poll ``predicate`` on the reactor until it is true."""
    while not predicate():
        yield deferLater(reactor, interval, lambda: None)
