"""The gateway's event feed: one ordered list of what happened, for automation.

Everything that an operator's tools would otherwise poll for becomes an
:class:`Event` here: clients connecting, leaving and replaced, health
changes, failovers, tunnel sets applied, limits hit, certificates about to
expire (docs/events.md lists every type). The feed numbers events with a
monotonically increasing ``id``, keeps the last ``history`` of them so a
reader can resume (``GET /events`` with ``Last-Event-ID``), and tells its
listeners (the SSE streams, the webhooks) each one as it is emitted.

``limit.hit`` events are digested (:class:`LimitDigest`): a flood of
refusals is one event per limit per interval with a count, never one per
refused connection.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger

from threshold.config.webhooks import type_matches
from threshold.logs import observer as log_observer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "DEFAULT_HISTORY",
    "Event",
    "EventFeed",
    "EventListener",
    "EventType",
    "LimitDigest",
    "Replay",
    "iso_time",
]

log = Logger(observer=log_observer)

#: Events kept for resuming, by default (``EventHistorySize``).
DEFAULT_HISTORY = 1000


class EventType(StrEnum):
    """Every event type (the SSE ``event:`` and the JSON ``type``)."""

    CLIENT_CONNECTED = "client.connected"
    CLIENT_DISCONNECTED = "client.disconnected"
    CLIENT_REPLACED = "client.replaced"
    CLIENT_HEALTH = "client.health"
    TUNNEL_FAILOVER = "tunnel.failover"
    TUNNELS_APPLIED = "tunnels.applied"
    LIMIT_HIT = "limit.hit"
    CERTIFICATE_EXPIRING = "certificate.expiring"
    WEBHOOK_DROPPED = "webhook.dropped"


class StreamNotice(StrEnum):
    """Events of one SSE stream only: never in the feed, never with an id."""

    #: The id asked for is not in the history: events were missed.
    RESET = "stream.reset"
    #: The reader was too slow: its backlog went over MaxEventBacklog.
    CUT = "stream.cut"
    #: The gateway is stopping.
    CLOSED = "stream.closed"


def iso_time(t: float) -> str:
    """UTC ISO 8601 with milliseconds: ``2026-12-02T01:02:03.456Z``."""
    whole = int(t)
    millis = int(round((t - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


@dataclass(frozen=True, slots=True)
class Event:
    """One event: ``id`` (0 for stream notices), ``type``, UTC time, data."""

    id: int
    type: str
    time: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"id": 7, "type": "client.connected", "time": "...", "data": {...}}``."""
        body: dict[str, Any] = {"id": self.id, "type": self.type}
        body["time"] = iso_time(self.time)
        body["data"] = self.data
        return body


class EventListener(Protocol):
    """Who is told every event (an SSE stream, a webhook)."""

    def event(self, event: Event) -> None:
        """One new event, in id order."""

    def feed_closed(self) -> None:
        """The feed ends (the gateway stops): no event follows."""


@dataclass(frozen=True, slots=True)
class Replay:
    """What a reader resuming after an id gets: the events it missed.

    ``reset`` is set when the id is not in the history (too old, or from
    before a restart): the reader missed events it cannot get back.
    """

    events: tuple[Event, ...]
    reset: Event | None = None


class EventFeed:
    """The numbered events, a bounded history, and who listens.

    ``wall_clock`` dates the events; ``clock`` runs the limit digest's
    timers. Listeners are told synchronously, in the order they joined; a
    listener that raises is logged and kept.
    """

    def __init__(
        self,
        clock: IReactorTime,
        wall_clock: Callable[[], float] = time.time,
        history: int = DEFAULT_HISTORY,
        limit_interval: float = 10.0,
        id_base: int = 0,
    ) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self._history: deque[Event] = deque(maxlen=history)
        # The first event is id_base + 1. The gateway passes its start time
        # in milliseconds, so ids keep increasing across restarts (fewer
        # than one event per millisecond on average) and a reader's id from
        # a previous run is older than the history: stream.reset, never a
        # silent replay of unrelated events.
        self._last_id = id_base
        self._listeners: list[EventListener] = []
        #: Events emitted since start, per type (metrics).
        self.emitted: Counter[str] = Counter()
        self.closed = False
        self.limits = LimitDigest(self, clock, limit_interval)

    @property
    def last_id(self) -> int:
        """The id of the newest event (``id_base`` before the first)."""
        return self._last_id

    @property
    def oldest_id(self) -> int | None:
        """The id of the oldest event kept, None before the first."""
        return self._history[0].id if self._history else None

    def listen(self, listener: EventListener) -> Callable[[], None]:
        """Tell ``listener`` every event from now on; returns how to stop."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    def emit(self, event_type: str, **data: Any) -> Event | None:
        """Number, keep and hand out one event (None once the feed is closed)."""
        if self.closed:
            return None
        self._last_id += 1
        event = Event(self._last_id, str(event_type), self.wall_clock(), data)
        self._history.append(event)
        self.emitted[event.type] += 1
        for listener in list(self._listeners):
            try:
                listener.event(event)
            except Exception:
                log.failure("event {type} {id}: a listener failed", **_ids(event))
        return event

    def notice(self, notice: StreamNotice, **data: Any) -> Event:
        """A stream notice (not numbered, not kept)."""
        return Event(0, notice.value, self.wall_clock(), data)

    def replay(self, after: int | None) -> Replay:
        """The events after id ``after`` (None: none, the reader starts now;
        0: every event kept).

        An id older than the history, or newer than the newest (a reader
        of a previous run of the gateway), gets every kept event and a
        ``stream.reset`` notice saying what is missing.
        """
        if after is None or after == self._last_id:
            return Replay(())
        if after == 0:
            return Replay(tuple(self._history))  # "every event kept"
        oldest = self.oldest_id
        if after > self._last_id or oldest is None or after < oldest - 1:
            reset = self.notice(
                StreamNotice.RESET,
                RequestedId=after,
                OldestId=oldest,
                LastId=self._last_id,
                Reason=(
                    "the id is newer than the newest event: not an id of this"
                    " gateway (another gateway's, or its clock went back)"
                    if after > self._last_id
                    else "the id is older than the history kept"
                    " (EventHistorySize): events were missed"
                ),
            )
            return Replay(tuple(self._history), reset)
        skip = after - oldest + 1
        return Replay(tuple(e for i, e in enumerate(self._history) if i >= skip))

    def close(self) -> None:
        """The gateway stops: no more events; listeners are told."""
        if self.closed:
            return
        self.closed = True
        self.limits.stop()
        for listener in list(self._listeners):
            try:
                listener.feed_closed()
            except Exception:
                log.failure("event feed closed: a listener failed")
        self._listeners.clear()


def _ids(event: Event) -> dict[str, Any]:
    return {"type": event.type, "id": event.id}


@dataclass
class _Window:
    """One limit's digest interval: hits counted since its event."""

    timer: IDelayedCall
    count: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    subjects: set[tuple[tuple[str, Any], ...]] = field(default_factory=set)


#: Distinct subjects (sources, clients) counted per window; past it, "more".
MAX_SUBJECTS = 100


class LimitDigest:
    """``limit.hit`` events, at most one per limit per interval.

    The first hit of a limit is an event at once (``Count`` 1); the hits
    that follow within ``interval`` seconds are counted, and when the
    interval ends one event says how many there were (``Count``), the
    last one's details and how many distinct subjects were hit
    (``Subjects``, at most :data:`MAX_SUBJECTS`). A flood keeps producing
    one event per interval; a quiet interval ends the digest.
    """

    def __init__(self, feed: EventFeed, clock: IReactorTime, interval: float) -> None:
        self.feed = feed
        self.clock = clock
        self.interval = interval
        self._windows: dict[str, _Window] = {}
        #: Turns a hit's ``where`` into event fields, at the event only.
        self.render: Callable[[dict[str, Any]], dict[str, Any]] = dict

    def hit(
        self, limit: str, where: dict[str, Any] | None = None, /, **fields: Any
    ) -> None:
        """One hit of ``limit``; ``where`` (or the keywords) says whose
        (ClientId, Tunnel, Source).

        On the path of every refused connection: a flood costs a counter
        per hit; the event fields are made at the event only.
        """
        if self.feed.closed:
            return
        if where is None:
            where = fields
        window = self._windows.get(limit)
        if window is None:
            self._emit(limit, 1, where, 1)
            self._windows[limit] = _Window(self._timer(limit))
            return
        window.count += 1
        window.data = where
        if len(window.subjects) < MAX_SUBJECTS:
            window.subjects.add(tuple(where.items()))

    def _timer(self, limit: str) -> IDelayedCall:
        return self.clock.callLater(self.interval, self._flush, limit)

    def _flush(self, limit: str) -> None:
        window = self._windows.pop(limit)
        if window.count == 0:
            return
        self._emit(limit, window.count, window.data, len(window.subjects))
        self._windows[limit] = _Window(self._timer(limit))

    def _emit(
        self, limit: str, count: int, where: dict[str, Any], subjects: int
    ) -> None:
        self.feed.emit(
            EventType.LIMIT_HIT,
            Limit=limit,
            Count=count,
            Subjects=subjects,
            IntervalSeconds=self.interval,
            **{k: v for k, v in self.render(where).items() if v is not None},
        )

    def pending(self) -> dict[str, int]:
        """Hits counted and not yet reported, per limit (for tests and views)."""
        return {k: w.count for k, w in self._windows.items()}

    def stop(self) -> None:
        """Stop the timers (what was counted and not reported is dropped)."""
        for window in self._windows.values():
            if window.timer.active():
                window.timer.cancel()
        self._windows.clear()


def matching(patterns: Iterable[str] | None) -> Callable[[str], bool]:
    """A test of event types against patterns (``client.*``); None: all."""
    if patterns is None:
        return lambda event_type: True
    chosen = tuple(patterns)
    return lambda event_type: type_matches(chosen, event_type)
