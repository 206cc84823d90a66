"""The streams the server opens to the client: one per internet user.

Each starts with a header line naming a service; the client looks it up in
``ServiceToLocalAddrMap``, connects to that local address and relays the
rest verbatim, both ways. An unknown service, a bad header or a failed
local connection resets the stream. The server only names services: it
cannot make the client connect anywhere else.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.client.endpoints import Cancel, connect_relay
from threshold.client.udp import serve_udp
from threshold.logs import observer as log_observer
from threshold.relay import PrefixRelay, RelayEnd, RelayState, tune_transport
from threshold.wire.handshake import (
    PROTO_UDP,
    HandshakeError,
    LineBuffer,
    parse_stream_header,
)

if TYPE_CHECKING:
    from threshold.client.settings import ClientSettings

log = Logger(observer=log_observer)

# A gateway sends the same few header lines over and over: each is parsed
# (JSON and the schema, about 5% of the client's busy time) once. The
# headers are frozen; a bad line raises each time (exceptions are not kept).
_parse_header = lru_cache(maxsize=1024)(parse_stream_header)

# Where the stream waits for its local connection (see PrefixRelay.hold).
_CONNECTING = frozenset({RelayState.HOLDING, RelayState.HELD_EOF})


class ServiceStream(PrefixRelay):
    """A stream the server opened: read the service header, connect, relay.

    The prefix is the header line (at most ``MAX_LINE`` bytes). While the
    local connection is made the stream is held: reading pauses, and what
    arrives meanwhile stays within the stream's window.
    """

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__()
        self.settings = settings
        self.buffer = LineBuffer()
        self.service: str | None = None
        self._connecting: Cancel | None = None

    @property
    def local(self) -> RelayEnd | None:
        """The local service's end of the relay, once spliced."""
        return self.peer

    def connectionMade(self) -> None:  # noqa: N802
        """The header comes first."""
        self.read_prefix()

    def prefix_received(self, data: bytes) -> None:
        """Read the header line; then connect to its service."""
        try:
            line, rest = self.buffer.feed(data)
            if line is None:
                return
            header = _parse_header(line)
        except HandshakeError as e:
            self._reset("bad stream header: {why}", why=e)
            return
        self.service = header.service
        address = self.settings.services.get(header.service)
        if address is None:
            self.settings.stats.unknown_service += 1
            self._reset('unknown service "{service}"', service=header.service)
            return
        if header.proto == PROTO_UDP:
            # A UDP flow: its own protocol takes the stream (docs/udp.md).
            serve_udp(
                self.transport,
                self.settings,
                header.service,
                address,
                header.proxy_v2,
                rest,
            )
            return
        self.hold(rest)
        endpoint = self.settings.local_endpoint(*address)
        self._connecting = connect_relay(endpoint, self._connected, self._failed)

    def _reset(self, message: str, **fields: object) -> None:
        # The session's name says which gateway ("session to gw1:9056 ...").
        log.warn(
            "{session}: stream {stream_id}: " + message + "; reset",
            session=self.transport.session.name,
            stream_id=self.transport.id,
            **fields,
        )
        self.give_up(abort=True)

    def _connected(self, local: RelayEnd) -> None:
        self._connecting = None
        if self.state not in _CONNECTING:
            # The stream ended while we were connecting.
            local.transport.loseConnection()
            return
        tune_transport(local.transport)
        self.splice(local)

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state not in _CONNECTING:
            # The stream ended while we were connecting and relay_closed
            # cancelled the attempt: Twisted's endpoints then fail with
            # ConnectingCancelledError, others with CancelledError.
            return
        self.settings.stats.local_failures += 1
        self._reset(
            'cannot connect to service "{service}": {why}',
            service=self.service,
            why=failure.getErrorMessage(),
        )

    def relay_closed(self, reason: Failure) -> None:
        """The stream ended: stop connecting to its service, if still at it."""
        if self._connecting is not None:
            self._connecting()
