"""Test doubles and fixtures for code built on threshold's session layer.

Shipped in the package (as txtorcon does) so that tests of the server, the
client and anything else built on :mod:`threshold.mux` share them.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.mux.stream import Stream


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
