"""Test doubles and fixtures for code built on threshold's session layer.

Shipped in the package (as txtorcon does) so that tests of the server, the
client and anything else built on :mod:`threshold.mux` share them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.mux.stream import Stream
from threshold.wire.frames import MAX_UINT32, TYPE_DATA, FrameDecoder, encode_header


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole frame, payload and all (the session itself streams them)."""

    type: int
    flags: int
    stream_id: int
    length: int
    payload: bytes = b""


def encode_frame(frame: Frame) -> bytes:
    """Encode a whole frame; a Data frame's length is its payload's."""
    if frame.type == TYPE_DATA:
        return (
            encode_header(TYPE_DATA, frame.flags, frame.stream_id, len(frame.payload))
            + frame.payload
        )
    return encode_header(frame.type, frame.flags, frame.stream_id, frame.length)


class _FrameCollector:
    """A FrameHandler that assembles whole :class:`Frame` objects."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._header: tuple[int, int, int, int] | None = None
        self._payload: list[bytes] = []

    def frame_header(self, type_: int, flags: int, stream_id: int, length: int) -> None:
        if type_ == TYPE_DATA:
            self._header = (type_, flags, stream_id, length)
            self._payload = []
        else:
            self.frames.append(Frame(type_, flags, stream_id, length))

    def frame_payload(self, stream_id: int, data: bytes) -> None:
        self._payload.append(data)

    def frame_end(self, stream_id: int, flags: int) -> None:
        assert self._header is not None
        self.frames.append(Frame(*self._header, payload=b"".join(self._payload)))
        self._header = None


class FrameReader:
    """Collects whole frames from a byte stream split anyhow."""

    def __init__(self, max_data_length: int = MAX_UINT32) -> None:
        self._collector = _FrameCollector()
        self._decoder = FrameDecoder(self._collector, max_data_length)

    def feed(self, data: bytes) -> list[Frame]:
        """Feed bytes; return the frames completed by them."""
        self._decoder.feed(data)
        frames = self._collector.frames
        self._collector.frames = []
        return frames


def decode_frames(data: bytes, max_data_length: int = MAX_UINT32) -> list[Frame]:
    """Decode a complete byte string of frames."""
    return FrameReader(max_data_length).feed(data)


class TurnClock(Clock):
    """A Clock that can also run one turn of a reactor loop.

    ``Clock.advance(0)`` runs calls scheduled for now, and then the ones
    those schedule for now too; a reactor runs the latter on its next
    iteration, after serving the other connections. :meth:`turn` does that.
    """

    def turn(self) -> int:
        """Run the calls due now, not those they schedule; return how many."""
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)
        return len(due)


@implementer(IHalfCloseableProtocol)
class Collector(Protocol):
    """Keeps what it receives and how the connection ended."""

    def __init__(self, pause_on_connect: bool = False) -> None:
        self.chunks: list[bytes] = []
        self.read_closed = False
        self.write_closed = False
        self.lost: Failure | None = None
        self.pause_on_connect = pause_on_connect

    @property
    def data(self) -> bytes:
        """Everything received so far."""
        return b"".join(self.chunks)

    def connectionMade(self) -> None:  # noqa: N802
        if self.pause_on_connect:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.chunks.append(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.read_closed = True

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.write_closed = True

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes, and half-closes back when the peer half-closes."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass


def connected_sessions(
    accept_on_client: Callable[[Stream], Protocol | None] = lambda s: None,
    accept_on_server: Callable[[Stream], Protocol | None] = lambda s: None,
    client_config: SessionConfig | None = None,
    server_config: SessionConfig | None = None,
    clock: Clock | None = None,
) -> tuple[MuxSession, MuxSession, iosim.IOPump]:
    """Two sessions joined in memory: (dialing side, accepting side, pump)."""
    clock = clock or Clock()
    quiet = SessionConfig(keepalive_interval=0)
    client, server, pump = iosim.connectedServerAndClient(
        lambda: MuxSession(
            client=False,
            clock=clock,
            handler=StreamAcceptor(accept_on_server),
            config=server_config or quiet,
            name="server",
        ),
        lambda: MuxSession(
            client=True,
            clock=clock,
            handler=StreamAcceptor(accept_on_client),
            config=client_config or quiet,
            name="client",
        ),
        clock=clock,
    )
    return client, server, pump
