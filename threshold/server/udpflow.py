"""One UDP flow on the gateway: a user's address, relayed over one stream.

A :class:`UdpFlow` is made by the UDP front end (:mod:`threshold.server.udp`)
for the first datagram from a user address (ip, port) and holds one stream
on a serving client's session. User datagrams go out framed
(:mod:`threshold.wire.datagram`), the client's framed answers come back and
are sent to the user from the tunnel's socket. Rules (docs/udp.md):

- a datagram is sent whole or dropped: when the stream already holds
  ``MAX_QUEUED`` bytes it could not send (its window is full, or the
  session's socket), the datagram is dropped and counted (``window_full``),
  never buffered without bound;
- the flow ends after ``idle`` seconds without a datagram either way
  (TimeoutMixin, on the injected clock), when the client ends the stream
  (its session went away: the next datagram opens a new flow, on another
  client if this one is gone), on malformed framing (the stream is reset),
  or when its tunnel goes away.

The flow's one state field is :class:`FlowState` (OPEN, then CLOSED).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from threshold.logs import observer as log_observer
from threshold.server.stats import UdpDrop, UdpFlowEnd
from threshold.wire import datagram

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from threshold.mux.stream import Stream
    from threshold.server.shaping import FlowMeter
    from threshold.server.stats import Flow, GatewayStats
    from threshold.server.tunnels import Tunnel

__all__ = ["MAX_QUEUED", "FlowOwner", "FlowState", "UdpFlow"]

log = Logger(observer=log_observer)

#: Bytes a flow's stream may hold unsent before datagrams are dropped: a few
#: datagrams' worth absorbs a short stall of the session's socket, and more
#: would only add delay that UDP protocols (DNS, games, WireGuard) handle
#: better as loss.
MAX_QUEUED = 64 * 1024


class FlowState(enum.Enum):
    """Where a flow is: relaying, or ended (its table entry gone)."""

    OPEN = "open"
    CLOSED = "closed"


_TRANSITIONS = {FlowState.OPEN: frozenset({FlowState.CLOSED})}


class FlowOwner(Protocol):
    """What a flow needs of its front end."""

    clock: IReactorTime
    stats: GatewayStats
    max_datagram: int
    log_flows: bool

    def send_to_user(self, data: bytes, address: tuple[str, int]) -> bool:
        """Send one datagram to the user; False when the socket refused it."""
        ...

    def flow_ended(self, flow: UdpFlow) -> None:
        """The flow is over: forget it, free its slots."""
        ...


class _StreamEnd(TwistedProtocol):
    """The protocol of the flow's stream: hands its events to the flow."""

    def __init__(self, flow: UdpFlow) -> None:
        self.flow = flow
        #: The policy's bandwidth shaping asks the stream's reader (none here).
        self.reading = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Framed datagrams from the client."""
        self.flow.stream_data(data)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        """The stream ended (the client's RST or FIN, or its session lost)."""
        self.flow.stream_lost(reason)


class UdpFlow(TimeoutMixin):
    """One user address of one UDP tunnel, relayed over one stream.

    Shaped as the policy's ``RelayedConnection``: ``transport`` is the
    tunnel's UDP socket (the user's side), ``peer.transport`` the stream,
    ``flow`` the byte counts, :meth:`give_up` ends the flow.
    """

    state = FlowState.OPEN
    meter: FlowMeter | None = None
    #: The byte counts, given by :meth:`opened` once the stream is open.
    flow: Flow

    def __init__(
        self,
        owner: FlowOwner,
        tunnel: Tunnel,
        address: tuple[str, int],
        source: str,
        idle: float,
        transport: object,
    ) -> None:
        self.owner = owner
        self.tunnel = tunnel
        self.address = address
        self.source = source
        self.idle = idle
        self.transport = transport
        self.peer = _StreamEnd(self)
        self.started = owner.clock.seconds()
        self.datagrams_in = 0
        self.datagrams_out = 0
        self._decoder = datagram.DatagramDecoder()
        # TimeoutMixin schedules with the global reactor unless told.
        self.callLater = owner.clock.callLater

    def opened(self, flow: Flow, first: int) -> None:
        """The stream is open with the first datagram (``first`` bytes) in it."""
        self.flow = flow
        flow.bytes_in = first
        self.datagrams_in = 1
        self.setTimeout(self.idle)

    @property
    def stream(self) -> Stream:
        """The flow's stream (set once opened)."""
        return self.peer.transport

    # -- user to service ----------------------------------------------------

    def send(self, data: bytes) -> None:
        """Relay one user datagram, whole, or drop it when the stream is full."""
        if self.state is not FlowState.OPEN:
            return
        stats = self.owner.stats
        if self.stream.buffered()[0] + len(data) > MAX_QUEUED:
            stats.udp.dropped[UdpDrop.WINDOW_FULL] += 1
            return
        self.stream.write(datagram.encode(data))
        self.resetTimeout()
        stats.udp.datagrams_in += 1
        self.datagrams_in += 1
        self.flow.bytes_in += len(data)
        if self.meter is not None:
            self.meter.upload(len(data))

    # -- service to user ----------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        """Framed answers from the client: each goes to the user, whole."""
        if self.state is not FlowState.OPEN:
            return
        try:
            datagrams = self._decoder.feed(data)
        except datagram.FramingError as e:
            log.warn(
                "UDP flow {user} on {tunnel}: client {client} sent bad framing:"
                " {why}; reset",
                user=self.user_text(),
                tunnel=self.tunnel_text(),
                client=self.flow.client_id,
                why=str(e),
            )
            self.end(UdpFlowEnd.MALFORMED, abort=True)
            return
        if not datagrams:
            return
        owner = self.owner
        stats = owner.stats.udp
        self.resetTimeout()
        for answer in datagrams:
            if len(answer) > owner.max_datagram:
                stats.dropped[UdpDrop.OVERSIZE] += 1
                continue
            if not owner.send_to_user(answer, self.address):
                stats.dropped[UdpDrop.SEND_FAILED] += 1
                continue
            stats.datagrams_out += 1
            self.datagrams_out += 1
            self.flow.bytes_out += len(answer)
            if self.meter is not None:
                self.meter.download(len(answer))
            if self.state is not FlowState.OPEN:
                return  # the meter cut it (quota)

    # -- ending -------------------------------------------------------------

    def timeoutConnection(self) -> None:  # noqa: N802
        """No datagram either way for ``idle`` seconds."""
        self.end(UdpFlowEnd.IDLE)

    def stream_lost(self, reason: Failure) -> None:
        """The client ended the stream (or its session is gone).

        Bytes of an incomplete datagram left over mean the client's framing
        was cut short: counted as malformed (the datagram is lost).
        """
        if self._decoder.pending:
            self.end(UdpFlowEnd.MALFORMED)
        else:
            self.end(UdpFlowEnd.STREAM_ENDED)

    def give_up(self, abort: bool = False) -> None:
        """The policy cut the flow (quota)."""
        self.end(UdpFlowEnd.QUOTA_CUT, abort=True)

    def end(self, why: UdpFlowEnd, abort: bool = False) -> None:
        """End the flow once: close (or reset) the stream, count, log."""
        if self.state is not FlowState.OPEN:
            return
        assert FlowState.CLOSED in _TRANSITIONS[self.state]
        self.state = FlowState.CLOSED
        self.setTimeout(None)
        stream = self.stream
        if stream is not None and not stream.closed:
            if abort:
                stream.abortConnection()
            else:
                stream.loseConnection()
        if self.meter is not None:
            self.meter.close()
        owner = self.owner
        owner.stats.udp.flows_ended[why] += 1
        owner.flow_ended(self)
        if not owner.log_flows:
            return
        log.info(
            "UDP flow {user} on {tunnel} via {client}/{service}: {din} datagrams"
            " ({bin} bytes) in, {dout} ({bout}) out, {duration:.3f}s, {end}",
            user=self.user_text(),
            tunnel=self.tunnel_text(),
            client=self.flow.client_id,
            service=self.tunnel.backend_service,
            din=self.datagrams_in,
            bin=self.flow.bytes_in,
            dout=self.datagrams_out,
            bout=self.flow.bytes_out,
            duration=owner.clock.seconds() - self.started,
            end=why.value,
        )

    def user_text(self) -> str:
        """The user's address for log lines."""
        host, port = self.address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def tunnel_text(self) -> str:
        """The tunnel's address for log lines (``host:port/udp``)."""
        host, port = self.tunnel.group
        return f"[{host}]:{port}/udp" if ":" in host else f"{host}:{port}/udp"
