"""A UDP flow on the tunnel client: one stream, one local UDP socket.

The server opens a stream whose header line says ``"proto": "udp"``
(:func:`threshold.wire.handshake.parse_stream_header`);
:class:`~threshold.client.streams.ServiceStream` hands it to
:func:`serve_udp`. The flow gets its own UDP socket, connected to the
service's mapped address, so the local service sees one source port per
user flow and its answers come back to this flow only. Each framed
datagram from the stream (:mod:`threshold.wire.datagram`) is sent to the
service whole; each datagram the service answers is framed onto the
stream, or dropped and counted when the stream already holds
``MAX_QUEUED`` unsent bytes (its window is full): UDP semantics, never
unbounded buffering.

With ``"proxyV2": true`` the first framed record is a PROXY v2 DGRAM
header (the user's address), sent in front of every datagram to the
service: a UDP service reads each datagram on its own, so a header once
per flow could not be tied to the datagrams after it.

The server ends the flow (idle, tunnel removed): its FIN closes the socket.
Bad framing resets the stream. One state field: :class:`UdpStreamState`.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from typing import TYPE_CHECKING

from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.logs import observer as log_observer
from threshold.wire import datagram

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort, IReactorUDP

    from threshold.client.settings import ClientSettings
    from threshold.mux.stream import Stream

__all__ = ["MAX_QUEUED", "UdpDrop", "UdpStreamState", "UdpServiceStream", "serve_udp"]

log = Logger(observer=log_observer)

#: Unsent bytes a flow's stream may hold before answers are dropped (as on
#: the gateway, server/udpflow.py).
MAX_QUEUED = 64 * 1024
#: The largest datagram sent to a local service (the largest over IPv4).
MAX_LOCAL_DATAGRAM = 65507


#: Kernel buffer asked for each flow's socket (capped by the host's limits):
#: a service's burst of answers waits there, not in the process.
SOCKET_BUFFER = 1024 * 1024


class UdpDrop(enum.StrEnum):
    """Why the client dropped a datagram (``ClientStats.udp_dropped``)."""

    #: The stream to the gateway had no room (its window full).
    WINDOW_FULL = "window_full"
    #: Too large to frame, or, with its PROXY header, to send.
    OVERSIZE = "oversize"
    #: The local service refused it (ICMP port unreachable) or the send failed.
    SEND_FAILED = "send_failed"


class UdpStreamState(enum.Enum):
    """A UDP flow's stream: relaying, or ended (its socket closed)."""

    OPEN = "open"
    CLOSED = "closed"


class _LocalSocket(DatagramProtocol):
    """The flow's UDP socket, connected to the local service."""

    def __init__(self, flow: UdpServiceStream) -> None:
        self.flow = flow

    def datagramReceived(self, data: bytes, addr: object) -> None:  # noqa: N802
        """An answer from the service."""
        self.flow.from_service(data)

    def connectionRefused(self) -> None:  # noqa: N802
        """ICMP port unreachable: nothing listens there (yet); keep the flow."""
        self.flow.dropped(UdpDrop.SEND_FAILED)


def _local_ip(host: str) -> str | None:
    """The mapped host as an IP address for a connected UDP socket, or None."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class UdpServiceStream(Protocol):
    """The protocol of a UDP flow's stream, with its local UDP socket."""

    state = UdpStreamState.OPEN

    def __init__(
        self,
        settings: ClientSettings,
        service: str,
        address: tuple[str, int],
        proxy_v2: bool,
    ) -> None:
        self.settings = settings
        self.service = service
        self.address = address
        self.proxy_v2 = proxy_v2
        #: Waiting for the PROXY header (the first record) when ``proxy_v2``.
        self._proxy: bytes | None = None if proxy_v2 else b""
        self._decoder = datagram.DatagramDecoder()
        self._socket: IListeningPort | None = None
        #: This flow's drops, said in one log line when it ends.
        self._dropped: Counter[str] = Counter()

    def connectionMade(self) -> None:  # noqa: N802
        """Open the flow's own socket, connected to the service."""
        stats = self.settings.stats
        host = _local_ip(self.address[0])
        if host is None:
            self._reset(
                'UDP service "{service}" maps to {host}: a UDP service needs an IP'
                " address",
                service=self.service,
                host=self.address[0],
            )
            return
        reactor = self.settings.udp_reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor  # type: ignore[assignment]
        udp: IReactorUDP = reactor  # type: ignore[assignment]
        interface = "::" if ":" in host else "0.0.0.0"
        try:
            self._socket = udp.listenUDP(
                0, _LocalSocket(self), interface=interface, maxPacketSize=65536
            )
            self._socket.connect(host, self.address[1])  # type: ignore[attr-defined]
            datagram.set_buffers(self._socket, SOCKET_BUFFER)
        except Exception as e:
            stats.local_failures += 1
            self._reset(
                'cannot open a UDP socket to service "{service}": {why}',
                service=self.service,
                why=e,
            )
            return
        stats.udp_flows += 1

    @property
    def stream(self) -> Stream:
        """The stream to the gateway."""
        return self.transport  # type: ignore[return-value]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Framed datagrams from the gateway: each to the service, whole."""
        if self.state is not UdpStreamState.OPEN:
            return
        try:
            records = self._decoder.feed(data)
        except datagram.FramingError as e:
            self._reset("bad UDP framing from the gateway: {why}", why=e)
            return
        for record in records:
            if self._proxy is None:
                why = datagram.check_proxy_v2(record)
                if why is not None:
                    self._reset("bad PROXY header of a UDP flow: {why}", why=why)
                    return
                self._proxy = record
                continue
            self._to_service(self._proxy + record if self._proxy else record)

    def _to_service(self, data: bytes) -> None:
        if len(data) > MAX_LOCAL_DATAGRAM:
            self.dropped(UdpDrop.OVERSIZE)
            return
        socket = self._socket
        if socket is None:
            return
        try:
            socket.write(data)  # type: ignore[call-arg]
        except Exception:
            self.dropped(UdpDrop.SEND_FAILED)

    def from_service(self, data: bytes) -> None:
        """An answer from the service: framed onto the stream, or dropped."""
        if self.state is not UdpStreamState.OPEN:
            return
        if len(data) > datagram.MAX_DATAGRAM:
            self.dropped(UdpDrop.OVERSIZE)
            return
        stream = self.stream
        if stream.buffered()[0] + len(data) > MAX_QUEUED:
            self.dropped(UdpDrop.WINDOW_FULL)
            return
        stream.write(datagram.encode(data))

    def dropped(self, why: UdpDrop) -> None:
        """Count one dropped datagram."""
        counts: Counter[str] = self.settings.stats.udp_dropped
        counts[why.value] += 1
        self._dropped[why.value] += 1

    def _reset(self, message: str, **fields: object) -> None:
        log.warn(
            "{session}: stream {stream_id}: " + message + "; reset",
            session=self.stream.session.name,
            stream_id=self.stream.id,
            **fields,
        )
        self._close()
        self.stream.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        """The gateway ended the flow: close the socket."""
        self._close()

    def _close(self) -> None:
        if self.state is UdpStreamState.CLOSED:
            return
        self.state = UdpStreamState.CLOSED
        if self._socket is not None:
            self._socket.stopListening()
            self._socket = None
        if self._dropped:
            log.info(
                "{session}: UDP flow of service {service} (stream {stream_id})"
                " ended; datagrams dropped: {dropped}",
                session=self.stream.session.name,
                service=self.service,
                stream_id=self.stream.id,
                dropped=", ".join(
                    f"{n} {why}" for why, n in sorted(self._dropped.items())
                ),
            )


def serve_udp(
    stream: Stream,
    settings: ClientSettings,
    service: str,
    address: tuple[str, int],
    proxy_v2: bool,
    rest: bytes,
) -> UdpServiceStream:
    """Make ``stream`` a UDP flow from now on, ``rest`` its first bytes.

    Called by the service stream once the header line is read: the UDP
    flow's protocol replaces it on the stream (later chunks go to it).
    """
    flow = UdpServiceStream(settings, service, address, proxy_v2)
    stream.protocol = flow
    flow.makeConnection(stream)
    if rest:
        flow.dataReceived(rest)
    return flow
