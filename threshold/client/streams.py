"""The streams the server opens to the client: one per internet user.

Each starts with a header line naming a service; the client looks it up in
``ServiceToLocalAddrMap``, connects to that local address and relays the
rest verbatim, both ways. An unknown service, a bad header or a failed
local connection resets the stream. The server only names services: it
cannot make the client connect anywhere else.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from threshold.logs import observer as log_observer
from threshold.relay import RelayEnd, tune_transport
from threshold.wire.handshake import HandshakeError, LineBuffer, parse_stream_header

if TYPE_CHECKING:
    from threshold.client.settings import ClientSettings
    from threshold.mux.stream import Stream

log = Logger(observer=log_observer)


class StreamState(enum.Enum):
    """Where a service stream is in its life."""

    #: Reading the header line.
    HEADER = "header"
    #: Connecting to the local service; the stream is paused meanwhile.
    CONNECTING = "connecting"
    #: Spliced to the local connection.
    RELAYING = "relaying"
    #: Reset (bad header, unknown service, failed connect) or ended.
    DONE = "done"


@implementer(IHalfCloseableProtocol)
class ServiceStream(Protocol):
    """A stream the server opened: read the service header, connect, relay."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.state = StreamState.HEADER
        self.buffer = LineBuffer()
        self.end = RelayEnd()
        self.service: str | None = None
        self._pending = b""
        self._connecting: Deferred[Any] | None = None

    def makeConnection(self, transport: Stream) -> None:  # noqa: N802
        """Both this header reader and the relay end sit on the stream."""
        self.end.makeConnection(transport)
        Protocol.makeConnection(self, transport)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Read the header line; hold the rest until the service is up."""
        if self.state is StreamState.RELAYING:
            self.end.dataReceived(data)
        elif self.state is StreamState.CONNECTING:
            self._pending += data
        elif self.state is StreamState.HEADER:
            self._header(data)

    def _header(self, data: bytes) -> None:
        try:
            line, rest = self.buffer.feed(data)
            if line is None:
                return
            header = parse_stream_header(line)
        except HandshakeError as e:
            self._reset("bad stream header: {why}", why=e)
            return
        self.service = header.service
        address = self.settings.services.get(header.service)
        if address is None:
            self.settings.stats.unknown_service += 1
            self._reset('unknown service "{service}"', service=header.service)
            return
        # Hold the stream while the local connection is made: what arrives
        # meanwhile stays within the stream's window.
        self.state = StreamState.CONNECTING
        self._pending = rest
        self.transport.pauseProducing()
        endpoint = self.settings.local_endpoint(*address)
        self._connecting = endpoint.connect(_OneShotFactory(RelayEnd()))
        self._connecting.addCallbacks(self._connected, self._failed)

    def _reset(self, message: str, **fields: object) -> None:
        self.state = StreamState.DONE
        log.warn(
            "stream {stream_id}: " + message + "; reset",
            stream_id=self.transport.id,
            **fields,
        )
        self.transport.abortConnection()

    def _connected(self, local: RelayEnd) -> None:
        self._connecting = None
        if self.state is not StreamState.CONNECTING:
            # The stream ended while we were connecting.
            local.transport.loseConnection()
            return
        tune_transport(local.transport)
        self.state = StreamState.RELAYING
        pending, self._pending = self._pending, b""
        if pending:
            local.transport.write(pending)
        self.end.join(local)
        self.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state is not StreamState.CONNECTING:
            # The stream ended while we were connecting and connectionLost
            # cancelled the attempt: Twisted's endpoints then fail with
            # ConnectingCancelledError, others with CancelledError.
            return
        self.settings.stats.local_failures += 1
        self._reset(
            'cannot connect to service "{service}": {why}',
            service=self.service,
            why=failure.getErrorMessage(),
        )

    def readConnectionLost(self) -> None:  # noqa: N802
        """The server half-closed: pass it on once connected.

        While connecting the stream is paused, and a paused stream holds a
        received FIN back until it is resumed, so it arrives after the join.
        """
        if self.state is StreamState.RELAYING:
            self.end.readConnectionLost()
        elif self.state is StreamState.HEADER:
            self.state = StreamState.DONE
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        """Our direction is shut."""
        self.end.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """The stream ended: end the local side the same way."""
        self.state = StreamState.DONE
        if self._connecting is not None:
            self._connecting.cancel()
        self.end.connectionLost(reason)


class _OneShotFactory(Factory):
    """``connectProtocol``'s factory, without its log lines.

    Twisted's ``connectProtocol`` builds a factory that keeps the default
    ``noisy = True``: two log lines ("Starting factory", "Stopping
    factory") per tunneled connection, measured at 18% of the client's busy
    time at high connection rates (docs/performance.md).
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:  # noqa: N802
        return self._protocol
