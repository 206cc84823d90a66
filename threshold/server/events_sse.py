"""``GET /events``: the event feed as Server-Sent Events, within bounds.

Each stream is a :class:`Subscriber`: it replays what the reader missed
(``Last-Event-ID``, or ``?since=`` for readers that cannot set headers),
then writes every event as it is emitted::

    id: 7
    event: client.connected
    data: {"id": 7, "type": "client.connected", "time": "...", "data": {...}}

Bounds, so that no reader makes the gateway hold memory without limit:

- at most ``max_subscribers`` streams at once (503 past it);
- a stream whose socket is full (its reader is slow) keeps the events
  that wait for it, at most ``max_backlog``; one more and the stream ends
  with a ``stream.cut`` notice;
- a comment line (``: keepalive``) every ``keepalive`` seconds on each
  stream, so proxies keep it and both ends notice a dead link;
- when the gateway stops, each stream ends with ``stream.closed``.
"""

from __future__ import annotations

import enum
import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from threshold.config.webhooks import EVENT_PATTERNS
from threshold.logs import observer as log_observer
from threshold.schema import SchemaError
from threshold.server.events import Event, EventFeed, StreamNotice, matching

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.iweb import IRequest

__all__ = [
    "EventStreams",
    "StreamRefused",
    "StreamSettings",
    "Subscriber",
    "encode",
    "requested_start",
]

log = Logger(observer=log_observer)

#: What a reader should wait before reconnecting (the SSE ``retry:`` field).
RETRY_MILLISECONDS = 1000

_ID = re.compile(r"[0-9]{1,18}")


class StreamRefused(Exception):
    """A ``GET /events`` refused: the status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class StreamSettings:
    """Bounds of the event streams (from the server config)."""

    max_subscribers: int = 32
    max_backlog: int = 1000
    keepalive: float = 15.0


def encode(event: Event) -> bytes:
    """One event in the SSE format; notices (id 0) carry no ``id:`` line,
    so a reader's Last-Event-ID stays the last real event's."""
    data = json.dumps(event.to_json(), separators=(",", ":"))
    head = f"id: {event.id}\n" if event.id else ""
    return f"{head}event: {event.type}\ndata: {data}\n\n".encode()


def requested_start(request: IRequest) -> int | None:
    """The id a reader resumes after: ``Last-Event-ID``, else ``?since=``.

    None when neither is given (the stream starts with the next event);
    StreamRefused 400 for a value that is not an id.
    """
    raw = request.getHeader(b"last-event-id")
    name = "Last-Event-ID"
    if raw is None or not raw.strip():
        values = request.args.get(b"since") or []
        if not values:
            return None
        raw, name = values[-1], "since"
    text = raw.decode("latin-1").strip()
    if not _ID.fullmatch(text):
        raise StreamRefused(
            400, f"{name} must be an event id (a whole number), not {text!r}"
        )
    return int(text)


def requested_types(request: IRequest) -> tuple[str, ...] | None:
    """The ``?type=`` patterns (repeated or comma-separated); None: all."""
    values = request.args.get(b"type") or []
    patterns = [
        p.strip()
        for v in values
        for p in v.decode("utf-8", "replace").split(",")
        if p.strip()
    ]
    if not values:
        return None
    try:
        return EVENT_PATTERNS.check(patterns)
    except SchemaError as e:
        raise StreamRefused(400, f"type: {e.message}") from None


class SubscriberState(enum.Enum):
    """Where one stream is; moves only along :data:`MOVES`."""

    #: The socket takes what is written: events go straight to it.
    LIVE = "live"
    #: The socket is full (its reader is slow): events wait in the backlog.
    PAUSED = "paused"
    #: Ended by the gateway (cut, stopping) or by the reader going away.
    ENDED = "ended"


MOVES: dict[SubscriberState, frozenset[SubscriberState]] = {
    SubscriberState.LIVE: frozenset({SubscriberState.PAUSED, SubscriberState.ENDED}),
    SubscriberState.PAUSED: frozenset({SubscriberState.LIVE, SubscriberState.ENDED}),
    SubscriberState.ENDED: frozenset(),
}

#: States in which the stream is open.
_OPEN = frozenset({SubscriberState.LIVE, SubscriberState.PAUSED})


@implementer(IPushProducer)
class Subscriber:
    """One ``GET /events`` stream: the request's producer and a feed listener.

    While the socket takes what is written, events go straight to it; while
    it is paused they wait in ``backlog`` (the events themselves, shared
    with the history), at most ``max_backlog``.
    """

    def __init__(
        self,
        streams: EventStreams,
        request: IRequest,
        wants: Callable[[str], bool],
    ) -> None:
        self.streams = streams
        self.request = request
        self.wants = wants
        self.state = SubscriberState.LIVE
        self.backlog: deque[Event] = deque()
        self.done: Deferred[bytes] = Deferred(lambda d: self._gone())
        self.peer = str(getattr(request, "getClientAddress", lambda: "?")())
        #: The id the reader resumed after (Last-Event-ID, ?since=), if any.
        self.after: int | None = None

    def _move(self, state: SubscriberState) -> None:
        if state not in MOVES[self.state]:
            raise AssertionError(f"event stream to {self.peer}: no move to {state}")
        self.state = state

    # -- the feed -------------------------------------------------------------

    def event(self, event: Event, encoded: bytes | None = None) -> None:
        """A new event (``encoded``: its SSE bytes, made once for every
        stream): write it, or keep it while the reader is behind."""
        if self.state is SubscriberState.ENDED or not self.wants(event.type):
            return
        if self.state is SubscriberState.LIVE:
            self.request.write(encoded if encoded is not None else encode(event))
            return
        if len(self.backlog) >= self.streams.settings.max_backlog:
            self.streams.cuts += 1
            log.warn(
                "event stream to {peer} cut: {count} events waiting for a slow"
                " reader (MaxEventBacklog)",
                peer=self.peer,
                count=len(self.backlog),
            )
            self.end(
                self.streams.feed.notice(
                    StreamNotice.CUT,
                    Reason=f"more than {self.streams.settings.max_backlog} events"
                    " waiting for this reader (MaxEventBacklog); resume with"
                    " Last-Event-ID",
                    LastSentId=self._last_sent(),
                )
            )
            return
        self.backlog.append(event)

    def _last_sent(self) -> int | None:
        """The id of the last event written before the backlog started."""
        if self.backlog:
            return self.backlog[0].id - 1
        return self.streams.feed.last_id

    def keepalive(self) -> None:
        """A comment line, when the socket takes it."""
        if self.state is SubscriberState.LIVE:
            self.request.write(b": keepalive\n\n")

    def end(self, final: Event | None) -> None:
        """Write the last notice (if any) and finish the response."""
        if self.state not in _OPEN:
            return
        self._move(SubscriberState.ENDED)
        self.backlog.clear()
        self.streams.forget(self)
        if final is not None:
            self.request.write(encode(final))
        self.request.unregisterProducer()
        # Klein finishes the request when the handler's Deferred fires.
        self.done.callback(b"")

    def _gone(self) -> None:
        """The reader went away (the handler's Deferred is cancelled)."""
        if self.state in _OPEN:
            self._move(SubscriberState.ENDED)
            self.backlog.clear()
            self.streams.forget(self)

    # -- IPushProducer: the socket's backpressure -------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        if self.state is SubscriberState.LIVE:
            self._move(SubscriberState.PAUSED)

    def resumeProducing(self) -> None:  # noqa: N802
        if self.state is not SubscriberState.PAUSED:
            return
        self._move(SubscriberState.LIVE)
        # A write may pause the stream again: what is left keeps waiting.
        while self.backlog and self.state is SubscriberState.LIVE:
            self.request.write(encode(self.backlog.popleft()))

    def stopProducing(self) -> None:  # noqa: N802
        self._gone()


class EventStreams:
    """Every open ``GET /events`` stream over one feed (a feed listener)."""

    def __init__(
        self,
        feed: EventFeed,
        clock: IReactorTime,
        settings: StreamSettings | None = None,
    ) -> None:
        self.feed = feed
        self.clock = clock
        self.settings = settings or StreamSettings()
        self.subscribers: list[Subscriber] = []
        #: Streams opened and cut since start (metrics).
        self.opened = 0
        self.cuts = 0
        self._keepalive = LoopingCall(self._beat)
        self._keepalive.clock = clock
        self._stop_listening: Callable[[], None] | None = None

    def start(self) -> None:
        """Listen to the feed and start the keep-alive timer."""
        if self._stop_listening is None:
            self._stop_listening = self.feed.listen(self)
        if not self._keepalive.running:
            self._keepalive.start(self.settings.keepalive, now=False)

    def open(self, request: IRequest) -> Deferred[bytes]:
        """Start one stream; fires (with the body's last bytes) when it ends.

        Raises StreamRefused: 400 for a bad id or type filter, 503 when
        ``max_subscribers`` streams are open.
        """
        after = requested_start(request)
        wants = matching(requested_types(request))
        if len(self.subscribers) >= self.settings.max_subscribers:
            raise StreamRefused(
                503,
                f"{self.settings.max_subscribers} event streams are open"
                " (MaxEventSubscribers); try again later",
            )
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        # Asks proxies such as nginx not to buffer the stream.
        request.setHeader(b"x-accel-buffering", b"no")
        if getattr(request, "method", b"GET") == b"HEAD":
            return succeed(b"")  # the headers only: no stream to hold open
        subscriber = Subscriber(self, request, wants)
        subscriber.after = after
        self.opened += 1
        request.write(b": threshold events\nretry: %d\n\n" % RETRY_MILLISECONDS)
        replay = self.feed.replay(after)
        if replay.reset is not None:
            request.write(encode(replay.reset))
        for event in replay.events:
            if wants(event.type):
                request.write(encode(event))
        if self.feed.closed:
            subscriber._move(SubscriberState.ENDED)
            request.write(encode(self._closed_notice()))
            return succeed(b"")
        self.subscribers.append(subscriber)
        request.registerProducer(subscriber, True)
        return subscriber.done

    def _closed_notice(self) -> Event:
        return self.feed.notice(
            StreamNotice.CLOSED,
            Reason="the gateway is stopping",
            LastId=self.feed.last_id,
        )

    def forget(self, subscriber: Subscriber) -> None:
        """A stream ended."""
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)

    # -- EventListener ---------------------------------------------------------

    def event(self, event: Event) -> None:
        """Hand one event to every stream (encoded once for all)."""
        if not self.subscribers:
            return
        encoded = encode(event)
        for subscriber in list(self.subscribers):
            subscriber.event(event, encoded)

    def feed_closed(self) -> None:
        """The gateway stops: every stream ends with ``stream.closed``."""
        self.close()

    def close(self) -> None:
        """End every stream and stop the timer."""
        if self._keepalive.running:
            self._keepalive.stop()
        stop, self._stop_listening = self._stop_listening, None
        if stop is not None:
            stop()
        for subscriber in list(self.subscribers):
            subscriber.end(self._closed_notice())

    def _beat(self) -> None:
        for subscriber in list(self.subscribers):
            subscriber.keepalive()

    def view(self) -> dict[str, Any]:
        """Counts for metrics and ``GET /server``."""
        return {
            "Subscribers": len(self.subscribers),
            "Opened": self.opened,
            "Cut": self.cuts,
        }
