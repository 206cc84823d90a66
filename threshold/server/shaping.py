"""Bandwidth shaping by backpressure, and the meter of one relayed connection.

A :class:`Bucket` is a token bucket of bytes for one direction of a tunnel
(``BandwidthBytesPerSecond`` of the entry) or of a client (its policy's,
shared by all its tunnels). A relayed chunk takes its size from every
bucket its direction draws from; a bucket may go into debt by one chunk.
A direction in debt stops reading from its sending side, as a full write
buffer would: the user's TCP connection for upload, the stream for
download (whose window then stops growing, so the client's sender
stops). Nothing is dropped or buffered beyond what one read brought. One
timer per bucket wakes its waiting directions when tokens are back, so
the long-run rate is exact (every byte pays) and a burst is at most
``BandwidthBurstBytes``.

The sending side is also paused by its consumer (the other side's full
buffer). Both pause the same producer, which has one switch; so a
direction resumes its producer only when the consumer is not holding it
(see :func:`consumer_holds`), and re-pauses at once if the consumer
resumes it while the bucket is in debt. Either way at most one read gets
past a pause.

A :class:`FlowMeter` is what a connection pays per chunk when any limit
applies to it (bandwidth, quota); without one it has no meter at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

if TYPE_CHECKING:
    from twisted.internet.interfaces import IPushProducer, ITransport

    from threshold.relay import RelayEnd
    from threshold.server.quota import QuotaAccount
    from threshold.server.stats import Flow

__all__ = [
    "Bucket",
    "Direction",
    "FlowMeter",
    "RelayedConnection",
    "burst_of",
    "consumer_holds",
]

#: A waiting direction is woken when a bucket holds this share of a second's
#: tokens again (at most 50 wake-ups a second), or its whole burst if less.
WAKE_SHARE = 0.02


class RelayedConnection(Protocol):
    """What the policy needs of a user's connection (the front end's)."""

    transport: ITransport
    #: The stream's end of the relay, once spliced.
    peer: RelayEnd | None
    flow: Flow | None

    def give_up(self, abort: bool = False) -> None:
        """Close the connection (abort: reset it)."""
        ...


def burst_of(rate: int, burst: int) -> int:
    """The burst that applies: ``burst``, or one second's worth when 0."""
    return burst if burst > 0 else rate


def consumer_holds(consumer: object) -> bool:
    """Whether ``consumer`` (a transport or stream) has paused its producer.

    A TCP transport says so in ``producerPaused`` (Twisted's
    ``FileDescriptor``); the relay's stand-in between a stream and the
    user's transport (:class:`threshold.server.retry.UserReading`) in
    ``paused``.
    """
    return bool(
        getattr(consumer, "producerPaused", False) or getattr(consumer, "paused", False)
    )


class Bucket:
    """Tokens of bytes for one direction of a tunnel or a client.

    ``on_limited(bucket)`` is told each time the bucket starts holding a
    direction back (the gateway logs it at most once a minute).
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: int,
        burst: int = 0,
        on_limited: Callable[[Bucket], None] | None = None,
    ) -> None:
        self.clock = clock
        self.rate = float(rate)
        self.burst = float(burst_of(rate, burst))
        now = clock.seconds()
        self.tokens = self.burst
        self.stamp = now
        self.on_limited = on_limited
        #: Bytes that passed, in all.
        self.moved = 0
        self._waiters: dict[Direction, None] = {}
        self._timer: IDelayedCall | None = None
        self._limited_total = 0.0
        self._limited_since: float | None = None
        # Bytes in the current and the previous whole second (recent rate).
        self._second = int(now)
        self._this_second = 0
        self._last_second = 0

    def set_rate(self, rate: int, burst: int = 0) -> None:
        """Change the rate (a changed entry); waiting directions follow it."""
        now = self.clock.seconds()
        self._refill(now)
        self.rate = float(rate)
        self.burst = float(burst_of(rate, burst))
        self.tokens = min(self.tokens, self.burst)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._schedule(now)

    def _refill(self, now: float) -> None:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.stamp = now

    def take(self, count: int, now: float) -> bool:
        """``count`` bytes passed; True when the bucket is now in debt."""
        self._refill(now)
        self.tokens -= count
        self.moved += count
        second = int(now)
        if second != self._second:
            self._last_second = self._this_second if second == self._second + 1 else 0
            self._this_second = 0
            self._second = second
        self._this_second += count
        return self.tokens < 0

    def in_debt(self, now: float) -> bool:
        """Whether a direction drawing from this bucket must wait now."""
        self._refill(now)
        return self.tokens < 0

    def wait(self, waiter: Direction, now: float) -> None:
        """Hold ``waiter`` until tokens are back."""
        self._waiters[waiter] = None
        if self._timer is None:
            self._schedule(now)
        if self._limited_since is None:
            self._limited_since = now
            if self.on_limited is not None:
                self.on_limited(self)

    def forget(self, waiter: Direction) -> None:
        """``waiter`` no longer waits (its connection ended)."""
        self._waiters.pop(waiter, None)
        if not self._waiters:
            self._idle(self.clock.seconds())

    def _schedule(self, now: float) -> None:
        wake = min(self.burst, self.rate * WAKE_SHARE)
        delay = max(0.0, (wake - self.tokens) / self.rate)
        self._timer = self.clock.callLater(delay, self._ready)

    def _ready(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        self._refill(now)
        if self.tokens < 0:  # more debt came (a direction read past a pause)
            self._schedule(now)
            return
        waiters = list(self._waiters)
        self._waiters.clear()
        self._idle(now)
        for waiter in waiters:
            waiter.bucket_ready(now)

    def _idle(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._limited_since is not None:
            self._limited_total += now - self._limited_since
            self._limited_since = None

    def limited_seconds(self) -> float:
        """Seconds during which this bucket held some direction back."""
        total = self._limited_total
        if self._limited_since is not None:
            total += self.clock.seconds() - self._limited_since
        return total

    def recent_rate(self) -> int:
        """Bytes that passed in the last whole second."""
        second = int(self.clock.seconds())
        if second == self._second:
            return self._last_second
        if second == self._second + 1:
            return self._this_second
        return 0

    @property
    def limiting(self) -> bool:
        """Whether some direction waits on this bucket now."""
        return bool(self._waiters)

    def view(self) -> dict[str, Any]:
        """The API's view: the limit and what it does now."""
        return {
            "BandwidthBytesPerSecond": int(self.rate),
            "BandwidthBurstBytes": int(self.burst),
            "RecentBytesPerSecond": self.recent_rate(),
            "LimitedSeconds": round(self.limited_seconds(), 3),
            "Limiting": self.limiting,
        }


class Direction:
    """One direction of one connection: the buckets it draws from.

    ``producer()`` is the side it reads from now (the user's transport, or
    the current stream), ``consumer()`` the side that pauses that producer
    when its buffer is full.
    """

    __slots__ = ("buckets", "clock", "producer", "consumer", "_waiting", "_paused")

    def __init__(
        self,
        clock: IReactorTime,
        buckets: tuple[Bucket, ...],
        producer: Callable[[], IPushProducer | None],
        consumer: Callable[[], object],
    ) -> None:
        self.clock = clock
        self.buckets = buckets
        self.producer = producer
        self.consumer = consumer
        self._waiting: Bucket | None = None
        self._paused = False

    def moved(self, count: int) -> None:
        """``count`` bytes were read on this direction (the hot path)."""
        now = self.clock.seconds()
        debt = False
        for bucket in self.buckets:
            if bucket.take(count, now):
                debt = True
        if debt:
            self._pause()
            if self._waiting is None:
                self._wait(now)

    def _pause(self) -> None:
        producer = self.producer()
        if producer is not None:
            self._paused = True
            producer.pauseProducing()

    def _wait(self, now: float) -> None:
        for bucket in self.buckets:
            if bucket.in_debt(now):
                self._waiting = bucket
                bucket.wait(self, now)
                return
        self._waiting = None
        if self._paused:
            self._paused = False
            producer = self.producer()
            # A consumer that paused the producer too resumes it when it
            # has room; resuming it here would read past its full buffer.
            if producer is not None and not consumer_holds(self.consumer()):
                producer.resumeProducing()

    def bucket_ready(self, now: float) -> None:
        """The bucket this direction waited on has tokens again."""
        self._waiting = None
        self._wait(now)

    def close(self) -> None:
        """The connection ended: wait no more."""
        if self._waiting is not None:
            self._waiting.forget(self)
            self._waiting = None

    @property
    def waiting(self) -> bool:
        """Whether this direction is held back now."""
        return self._waiting is not None


class FlowMeter:
    """What one relayed connection pays per chunk: shaping, quota counting.

    ``account`` is fed the growth of the flow's byte counters (the metrics'
    counters); ``on_cut()`` closes the connection; ``rebind(meter)`` is
    called when the flow moved to another client (a retry), to draw from
    that client's buckets and account from then on.
    """

    __slots__ = (
        "flow",
        "client_id",
        "clock",
        "up",
        "down",
        "account",
        "on_cut",
        "rebind",
        "_seen",
        "closed",
    )

    def __init__(
        self,
        flow: Flow,
        clock: IReactorTime,
        up: Direction | None,
        down: Direction | None,
        account: QuotaAccount | None,
        on_cut: Callable[[], None],
        rebind: Callable[[FlowMeter], None] | None = None,
    ) -> None:
        self.flow = flow
        self.client_id = flow.client_id
        self.clock = clock
        self.up = up
        self.down = down
        self.account = account
        self.on_cut = on_cut
        self.rebind = rebind
        self.closed = False
        self._seen = 0
        if account is not None:
            account.meters.add(self)
            self._count()  # the bytes read before the stream (a ClientHello)

    def upload(self, count: int) -> None:
        """``count`` bytes from the user were relayed (already in the flow)."""
        if self.flow.client_id != self.client_id:
            self._rebind()
        if self.up is not None:
            self.up.moved(count)
        if self.account is not None:
            self._count()

    def download(self, count: int) -> None:
        """``count`` bytes to the user were relayed (already in the flow)."""
        if self.flow.client_id != self.client_id:
            self._rebind()
        if self.down is not None:
            self.down.moved(count)
        if self.account is not None:
            self._count()

    def _count(self) -> None:
        flow = self.flow
        total = flow.bytes_in + flow.bytes_out
        grown = total - self._seen
        if grown:
            self._seen = total
            assert self.account is not None
            self.account.add(grown, self.clock.seconds())

    def _rebind(self) -> None:
        if self.account is not None:
            self._count()  # what came before the move was the first client's
            self.account.meters.discard(self)
        self.client_id = self.flow.client_id
        if self.rebind is not None:
            self.rebind(self)
        if self.account is not None:
            self.account.meters.add(self)

    def cut(self) -> None:
        """The client went over quota with ``cut``: close this connection."""
        if not self.closed:
            self.on_cut()

    def close(self) -> None:
        """The connection ended: count the last bytes, leave the buckets."""
        if self.closed:
            return
        if self.account is not None:
            self._count()
            self.account.meters.discard(self)
        for direction in (self.up, self.down):
            if direction is not None:
                direction.close()
        self.closed = True
