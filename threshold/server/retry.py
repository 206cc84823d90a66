"""A user's connection retried once on another client, the user none the wiser.

A client resets a stream (RST) when its local service refuses the
connection. If that happens before any byte came back to the user, the
connection is opened again on the tunnel's next healthy client and
everything sent so far (service header, PROXY header, the user's bytes) is
replayed, so a dead local service costs the user nothing.

For that, the front end keeps a copy of what it wrote on the stream
(:class:`Replay`) until the first byte (or the end of input) comes back,
at most :data:`REPLAY_LIMIT` bytes (the stream's initial window, so the
replay fits in the new stream's window at once): past that, or once
something came back, the copy is dropped and a reset is passed on as
before. A copy is kept only when the tunnel has another healthy client.
One retry per connection: a second reset before any byte is passed on to
the user and counted (``threshold_retry_failures_total``).

Only a reset by the client is retried: a session that ends under a stream
(a client killed) may have passed the bytes on already.

The stream's end of the relay, :class:`StreamSide`, sees the first byte
back and the reset; the user's transport is each stream's producer through
a :class:`UserReading`, which a retry detaches so that the failed stream,
as it ends, does not stop the user's reading (Twisted's rule: a consumer
that goes away stops its producer).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from threshold.logs import observer as log_observer
from threshold.mux.errors import SessionClosed, StreamLimitReached, StreamReset
from threshold.mux.settings import INITIAL_WINDOW
from threshold.relay import PrefixRelay, RelayEnd, RelayState
from threshold.server.stats import Limit

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from threshold.mux.session import MuxSession
    from threshold.server.stats import Flow, GatewayStats
    from threshold.server.tunnels import Tunnel

__all__ = [
    "REPLAY_LIMIT",
    "Replay",
    "ReplayState",
    "RetryClients",
    "RetryingRelay",
    "StreamSide",
    "UserReading",
]

log = Logger(observer=log_observer)

#: Most bytes kept for a replay: the initial window of the new stream.
REPLAY_LIMIT = INITIAL_WINDOW

_RELAYING = frozenset({RelayState.OPEN, RelayState.WRITE_SHUT, RelayState.READ_SHUT})
#: The user's states a retry can take over: it still sends, or has only
#: sent its EOF (replayed too); nothing has come back.
_RETRYABLE_USER = frozenset({RelayState.OPEN, RelayState.READ_SHUT})


class RetryClients(Protocol):
    """What a retry asks of the clients (the serving table)."""

    def session_for(self, client_id: str) -> MuxSession | None:
        """The client's session, if connected."""
        ...

    def is_healthy(self, tunnel: Tunnel, client_id: str) -> bool:
        """Whether the client may take the tunnel's connections now."""
        ...


class RetryFactory(Protocol):
    """What a retry uses of the front-end factory."""

    clients: RetryClients
    stats: GatewayStats


class ReplayState(enum.Enum):
    """Where a connection's replay copy is; moves only along :data:`MOVES`."""

    #: Everything sent is kept: a reset now is retried.
    HOLDING = "holding"
    #: Replayed on a second client; nothing kept, no byte back yet.
    RETRIED = "retried"
    #: Something came back, the copy outgrew the limit, or the retry's
    #: answer came: a reset is passed on.
    DONE = "done"


MOVES: dict[ReplayState, frozenset[ReplayState]] = {
    ReplayState.HOLDING: frozenset({ReplayState.RETRIED, ReplayState.DONE}),
    ReplayState.RETRIED: frozenset({ReplayState.DONE}),
    ReplayState.DONE: frozenset(),
}


class Replay:
    """What was sent on a connection's stream, until something comes back.

    ``others`` are the clients a reset may be retried on, best first.
    """

    def __init__(
        self, first: Sequence[bytes], others: Sequence[str], limit: int = REPLAY_LIMIT
    ) -> None:
        self.state = ReplayState.HOLDING
        self.others = list(others)
        self.limit = limit
        self._chunks = [c for c in first if c]
        self.size = sum(len(c) for c in self._chunks)
        if self.size > limit:
            self._move(ReplayState.DONE)

    def _move(self, state: ReplayState) -> None:
        if state not in MOVES[self.state]:
            raise AssertionError(f"replay: no move {self.state.value} -> {state.value}")
        self.state = state
        self._chunks = []

    @property
    def holding(self) -> bool:
        """True while a reset would be retried."""
        return self.state is ReplayState.HOLDING

    def sent(self, data: bytes) -> None:
        """``data`` was written on the stream: keep a copy, within the limit."""
        if self.state is not ReplayState.HOLDING:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._move(ReplayState.DONE)
        else:
            self._chunks.append(data)

    def answered(self) -> None:
        """A byte (or the end of input) came back: no retry from now on."""
        if self.state is not ReplayState.DONE:
            self._move(ReplayState.DONE)

    def take(self) -> list[bytes]:
        """Everything to replay on the next stream (once)."""
        chunks = self._chunks
        self._move(ReplayState.RETRIED)
        return chunks


@implementer(IPushProducer)
class UserReading:
    """The user's transport as the producer of one stream, detachable."""

    def __init__(self, transport: IPushProducer) -> None:
        self.transport = transport
        self.paused = False
        self.attached = True

    def pauseProducing(self) -> None:  # noqa: N802
        """The stream has no room: stop reading the user."""
        if self.attached and not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        """The stream has room again."""
        if self.attached and self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        """The stream is gone for good: so is the user's connection."""
        if self.attached:
            self.transport.stopProducing()

    def detach(self) -> None:
        """The stream is being replaced: undo its pause, take no more orders."""
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
        self.attached = False


class StreamSide(RelayEnd):
    """The stream end of a public connection: bytes to the user, and resets."""

    def __init__(self, public: RetryingRelay, client_id: str) -> None:
        super().__init__()
        self.public = public
        self.client_id = client_id
        self.reading: UserReading | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Count, then forward to the user; the first byte ends the replay."""
        public = self.public
        flow = public.flow
        if flow is not None and self.state in _RELAYING:
            replay = public.replay
            if replay is not None and replay.state is not ReplayState.DONE:
                replay.answered()
            if flow.bytes_in or flow.bytes_out:
                public.resetTimeout()
                flow.bytes_out += len(data)
            else:
                flow.bytes_out += len(data)
                public.arm_quiet_timer()
            meter = public.meter
            if meter is not None:
                meter.download(len(data))
        super().dataReceived(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        """The client's EOF reaches the user: no retry from now on."""
        replay = self.public.replay
        if replay is not None:
            replay.answered()
        super().readConnectionLost()

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        """A reset before any byte back is retried once; the rest goes on."""
        if (
            reason is not None
            and reason.check(StreamReset)
            and self.state is not RelayState.CLOSED
        ):
            replay = self.public.replay
            if replay is not None and replay.holding and retry(self.public, self):
                return
            if replay is not None and replay.state is ReplayState.RETRIED:
                replay.answered()
                self.public.retry_failed(self.client_id)
        super().connectionLost(reason)

    def detach(self) -> None:
        """Leave the relay without passing anything on (the stream is gone)."""
        self._to(RelayState.CLOSED)
        self.peer = None
        if self.reading is not None:
            self.reading.detach()


class RetryingRelay(PrefixRelay):
    """The user's side of the relay, able to move to a new stream.

    The base of :class:`~threshold.server.frontend.PublicConnection`, which
    provides ``factory``, ``tunnel``, ``flow``, ``_peer()`` and
    ``_group()``.
    """

    factory: RetryFactory
    tunnel: Tunnel | None
    flow: Flow | None
    #: TimeoutMixin's, in the front end.
    resetTimeout: Callable[[], None]  # noqa: N815
    #: What was sent on the stream while a reset would be retried.
    replay: Replay | None = None

    def arm_quiet_timer(self) -> None:
        """(Re)start the first-byte or idle timer (the front end's)."""
        raise NotImplementedError

    def _peer(self) -> str:
        raise NotImplementedError

    def _group(self) -> str:
        raise NotImplementedError

    def join(self, other: RelayEnd, first: Sequence[bytes] = ()) -> None:
        """Splice as usual, the user's transport feeding the stream detachably."""
        super().join(other, first)
        if isinstance(other, StreamSide) and other.state is not RelayState.CLOSED:
            # The stream took our transport as its producer: put a detachable
            # stand-in there, so that a retry can leave the failed stream.
            stream = other.transport
            stream.unregisterProducer()
            other.reading = UserReading(self.transport)
            stream.registerProducer(other.reading, True)

    def rejoin(self, stream_end: StreamSide, replay: list[bytes]) -> None:
        """Relay to a new stream, replaying what the failed one was sent."""
        failed = self.peer
        self.transport.unregisterProducer()
        self.peer = None
        assert self.flow is not None and self.tunnel is not None
        self.factory.stats.flow_moved(self.flow, stream_end.client_id)
        self.factory.stats.retries[self.tunnel.key] += 1
        log.info(
            "{peer} on {group}: stream reset by client {failed} before any byte "
            "back; retried on client {client}",
            peer=self._peer(),
            group=self._group(),
            failed=failed.client_id if isinstance(failed, StreamSide) else "?",
            client=stream_end.client_id,
        )
        user_eof = self.state is RelayState.READ_SHUT
        self.join(stream_end, replay)
        if user_eof:
            # The user's EOF went to the failed stream: it follows the replay.
            stream_end._close_write()

    def retry_failed(self, client_id: str) -> None:
        """The retried stream was reset too, before any byte: passed on."""
        assert self.tunnel is not None
        self.factory.stats.retry_failures[self.tunnel.key] += 1
        log.info(
            "{peer} on {group}: retried stream reset by client {client} too; "
            "reset passed on",
            peer=self._peer(),
            group=self._group(),
            client=client_id,
        )


def retry(public: RetryingRelay, failed: StreamSide) -> bool:
    """Move ``public`` from ``failed`` to a stream on its next healthy client.

    False (nothing changed) when there is none to take it, or the user is
    no longer in a state to be taken over.
    """
    replay = public.replay
    tunnel = public.tunnel
    if (
        replay is None
        or tunnel is None
        or public.peer is not failed
        or public.state not in _RETRYABLE_USER
    ):
        return False
    factory = public.factory
    clients = factory.clients
    for client_id in replay.others:
        if not clients.is_healthy(tunnel, client_id):
            continue
        session = clients.session_for(client_id)
        if session is None:
            continue
        end = StreamSide(public, client_id)
        try:
            session.open_stream(end)
        except StreamLimitReached:
            factory.stats.limit_hit(Limit.STREAMS_PER_SESSION)
            continue
        except SessionClosed:
            continue
        break
    else:
        return False
    failed.detach()
    public.rejoin(end, replay.take())
    return True
