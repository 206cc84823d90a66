"""The client's local SOCKS5 proxy: each CONNECT goes out through a gateway.

A local program connects to ``Egress.SocksListen`` and speaks SOCKS5
(:mod:`threshold.client.socks_codec`). For its CONNECT the client opens
an odd stream on the session of a gateway (the first of ``Servers``, in
order, that is connected now: not connecting, waiting or draining), writes
the egress request line (:mod:`threshold.wire.egress`) and waits for the
gateway's answer. The answer becomes the SOCKS5 reply (its reason mapped
to a reply code by ``REPLY_FOR_REFUSAL``); once connected the program's
connection and the stream are spliced (:mod:`threshold.relay`).

The whole negotiation, the gateway's answer included, has
``2 × ConnectTimeoutSeconds``: the gateway's own lookup and connection
time (``EgressConnectTimeoutSeconds``) fits in it with the defaults.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.client.gateway import LinkState
from threshold.client.socks_codec import (
    REPLY_FOR_REFUSAL,
    Connect,
    Fail,
    Reply,
    Send,
    SocksParser,
    encode_reply,
)
from threshold.logs import observer as log_observer
from threshold.mux.session import SessionClosed, StreamLimitReached
from threshold.relay import PrefixRelay, RelayState, tune_transport
from threshold.schema.kinds import format_address
from threshold.wire.egress import EgressError, encode_request, parse_answer
from threshold.wire.handshake import HandshakeError, LineBuffer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from threshold.client.gateway import GatewayLink
    from threshold.client.settings import ClientSettings
    from threshold.mux.session import MuxSession

__all__ = ["SocksConnection", "SocksFactory", "SocksPhase", "pick_gateway"]

log = Logger(observer=log_observer)


class SocksPhase(enum.Enum):
    """Where one SOCKS connection is; moves only along ``_MOVES``."""

    #: Reading the greeting and the request.
    NEGOTIATING = "negotiating"
    #: The request is on a stream: waiting for the gateway's answer.
    OPENING = "opening"
    #: Connected: relaying both ways.
    RELAYING = "relaying"
    #: Refused or failed: the reply is sent, the connection closing.
    FAILED = "failed"
    #: The connection ended.
    CLOSED = "closed"


_P = SocksPhase
_MOVES: dict[SocksPhase, frozenset[SocksPhase]] = {
    _P.NEGOTIATING: frozenset({_P.OPENING, _P.FAILED, _P.CLOSED}),
    _P.OPENING: frozenset({_P.RELAYING, _P.FAILED, _P.CLOSED}),
    _P.RELAYING: frozenset({_P.CLOSED}),
    _P.FAILED: frozenset({_P.CLOSED}),
    _P.CLOSED: frozenset(),
}


def pick_gateway(links: Sequence[GatewayLink]) -> tuple[GatewayLink, MuxSession] | None:
    """The first gateway of ``Servers`` whose session is connected now."""
    for link in links:
        client = link.session
        if link.state is LinkState.CONNECTED and client is not None:
            if not client.session.closed:
                return link, client.session
    return None


class _GatewayEnd(PrefixRelay):
    """The egress stream: the gateway's answer line first, then the bytes."""

    def __init__(self, socks: SocksConnection) -> None:
        super().__init__()
        self.socks = socks
        self.buffer = LineBuffer()

    def connectionMade(self) -> None:  # noqa: N802
        """The answer comes first."""
        self.read_prefix()

    def prefix_received(self, data: bytes) -> None:
        """Read the answer line; pass it on."""
        try:
            line, rest = self.buffer.feed(data)
            if line is None:
                return
            answer = parse_answer(line)
        except (HandshakeError, EgressError) as e:
            self.socks.failed(
                Reply.GENERAL_FAILURE, f"bad answer from the gateway: {e}"
            )
            self.give_up(abort=True)
            return
        if not answer.ok:
            assert answer.reason is not None
            self.socks.failed(
                REPLY_FOR_REFUSAL[answer.reason],
                f"refused by the gateway ({answer.reason.value}): {answer.error}",
            )
            self.give_up()
            return
        assert answer.bound is not None
        self.hold(rest)
        self.socks.gateway_connected(self, answer.bound)

    def prefix_ended(self) -> None:
        """The gateway closed the stream without an answer."""
        self.socks.failed(Reply.GENERAL_FAILURE, "the gateway closed without answering")
        self.give_up()

    def relay_closed(self, reason: Failure) -> None:
        """Reset before an answer: a gateway without egress (an older one)."""
        self.socks.failed(
            Reply.GENERAL_FAILURE,
            f"the gateway reset the stream ({reason.getErrorMessage()})",
        )


class SocksConnection(PrefixRelay):
    """One local program's SOCKS5 connection."""

    def __init__(self, factory: SocksFactory, source: str) -> None:
        super().__init__()
        self.factory = factory
        #: The local program's address (``peer`` is the relay's other end).
        self.source = source
        self.phase = SocksPhase.NEGOTIATING
        self.parser = SocksParser()
        self.target: str | None = None
        self.gateway: GatewayLink | None = None
        self.result = ""
        self._timer: IDelayedCall | None = None
        #: The stream, while its answer is awaited.
        self._end: _GatewayEnd | None = None
        self._started = factory.settings.clock.seconds()

    def _move(self, phase: SocksPhase) -> None:
        if phase not in _MOVES[self.phase]:
            raise AssertionError(f"SOCKS connection: {self.phase} -> {phase}")
        self.phase = phase
        if phase not in (SocksPhase.NEGOTIATING, SocksPhase.OPENING):
            self._cancel_timer()

    def connectionMade(self) -> None:  # noqa: N802
        """Negotiate within the time allowed."""
        settings = self.factory.settings
        self._timer = settings.clock.callLater(
            2 * settings.hello_timeout, self._timed_out
        )
        tune_transport(self.transport)
        self.read_prefix()

    def prefix_received(self, data: bytes) -> None:
        """Feed the parser; act on what it says."""
        for event in self.parser.feed(data):
            if isinstance(event, Send):
                self.transport.write(event.data)
            elif isinstance(event, Fail):
                self.failed(event.reply, event.why)
            elif isinstance(event, Connect):
                self._open(event)

    def prefix_ended(self) -> None:
        """The program closed before its request."""
        self.failed(None, "closed before the request")

    def _open(self, request: Connect) -> None:
        self.hold(request.rest)
        self.target = format_address(request.host, request.port)
        picked = pick_gateway(self.factory.links)
        if picked is None:
            self.failed(Reply.NETWORK_UNREACHABLE, "no gateway connected")
            return
        self.gateway, session = picked
        end = _GatewayEnd(self)
        try:
            stream = session.open_stream(end)
        except (SessionClosed, StreamLimitReached) as e:
            self.failed(Reply.GENERAL_FAILURE, f"cannot open a stream: {e}")
            return
        self._move(SocksPhase.OPENING)
        self._end = end
        stream.write(encode_request(request.host, request.port))

    def gateway_connected(self, end: _GatewayEnd, bound: tuple[str, int]) -> None:
        """The gateway connected: reply success, splice."""
        if self.phase is not SocksPhase.OPENING or self.state not in (
            RelayState.HOLDING,
            RelayState.HELD_EOF,
        ):
            end.give_up()
            return
        self._move(SocksPhase.RELAYING)
        self._end = None
        self.factory.settings.stats.egress_connections += 1
        self.result = f"connected (gateway bound {format_address(*bound)})"
        self.transport.write(encode_reply(Reply.SUCCEEDED, *bound))
        self.splice(end)
        if end.state not in (RelayState.CLOSING, RelayState.CLOSED):
            end.transport.resumeProducing()  # held by its hold()

    def failed(self, reply: Reply | None, why: str) -> None:
        """Refused or failed: send the reply (if any), close."""
        if self.phase not in (SocksPhase.NEGOTIATING, SocksPhase.OPENING):
            return
        self._move(SocksPhase.FAILED)
        self.factory.settings.stats.egress_refused += 1
        self.result = f"failed: {why}"
        end, self._end = self._end, None
        if end is not None:
            end.give_up(abort=True)  # no answer awaited any more
        if reply is not None and self.state not in (
            RelayState.CLOSING,
            RelayState.CLOSED,
        ):
            self.transport.write(encode_reply(reply))
        self.give_up()

    def _timed_out(self) -> None:
        self._timer = None
        self.failed(Reply.TTL_EXPIRED, "no answer in time")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def relay_closed(self, reason: Failure) -> None:
        """The program's connection ended: log it."""
        was = self.phase
        self._move(SocksPhase.CLOSED)
        end, self._end = self._end, None
        if end is not None:
            end.give_up(abort=True)
        if was is SocksPhase.RELAYING:
            self.result += f", closed: {reason.getErrorMessage()}"
        elif was is not SocksPhase.FAILED:
            self.result = f"abandoned while {was.value}"
        gateway = self.gateway.label if self.gateway is not None else "none"
        log.info(
            "SOCKS {source} to {target} via {gateway}: {result}, {duration:.3f}s",
            source=self.source,
            target=self.target or "?",
            gateway=gateway,
            result=self.result,
            duration=self.factory.settings.clock.seconds() - self._started,
        )


class SocksFactory(Factory):
    """The SOCKS5 listener's factory: one :class:`SocksConnection` each."""

    noisy = False

    def __init__(self, settings: ClientSettings, links: Sequence[GatewayLink]) -> None:
        self.settings = settings
        self.links = links

    def buildProtocol(self, addr: object) -> SocksConnection:  # noqa: N802
        """A connection from a local program."""
        host = getattr(addr, "host", None)
        peer = format_address(host, addr.port) if host else str(addr)  # type: ignore[attr-defined]
        return SocksConnection(self, peer)
