"""Webhooks: the event feed POSTed to the operator's URLs, signed, retried, bounded.

Each :class:`Webhook` listens to the feed and keeps the events whose type
its ``Events`` patterns match in a queue of at most ``MaxQueue`` (past
it the oldest is dropped, counted and reported once per interval as a
``webhook.dropped`` event). It posts them one at a time, in id order, as
the JSON of the event (the same object ``GET /events`` sends as data).

- A connection failure, a timeout (``TimeoutSeconds``), a 5xx, 408 or 429
  is retried after ``RetryInitialSeconds``, doubled each time up to
  ``RetryMaxSeconds``, ``MaxAttempts`` tries in all; then the event is
  given up (counted as a failure) and the next one goes.
- Another answer that is not 2xx (a 4xx: the receiver refuses it) is a
  failure at once: retrying would not change it.
- With a ``SecretFile`` each POST carries ``X-Threshold-Signature:
  t=<unix time>,v1=<hex HMAC-SHA256 of "<t>." + body>``: the receiver
  checks the HMAC and that ``t`` is recent, so a recorded POST cannot be
  replayed later (docs/events.md shows the check in Python).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from threshold.config import ConfigError
from threshold.logs import observer as log_observer
from threshold.server.events import Event, EventFeed, EventType, matching

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from threshold.config.webhooks import WebhookSettings

__all__ = [
    "SIGNATURE_HEADER",
    "DeliveryState",
    "Poster",
    "Webhook",
    "read_secret",
    "sign",
    "treq_poster",
]

log = Logger(observer=log_observer)

SIGNATURE_HEADER = "X-Threshold-Signature"

#: Seconds between two ``webhook.dropped`` events of one webhook.
DROP_REPORT_INTERVAL = 10.0

#: Longest secret file read (a key, not a document).
MAX_SECRET_BYTES = 4096

#: Answers worth retrying besides 5xx: the receiver is busy or slow.
_RETRIED = frozenset({408, 429})

#: ``post(url, body, headers, timeout)`` fires with the answer's status code.
Poster = Callable[[str, bytes, dict[str, str], float], Deferred[int]]


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``t=<timestamp>,v1=<hex HMAC-SHA256>``."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def read_secret(path: str, source: str = "server config") -> bytes:
    """The key in a webhook's ``SecretFile``; ConfigError when unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as e:
        raise ConfigError(
            source, f"cannot read {path}: {e.strerror or e}", "Webhooks.SecretFile"
        ) from None
    secret = data.strip()
    if len(data) > MAX_SECRET_BYTES or not secret:
        raise ConfigError(
            source,
            f"{path} must hold the key: 1 to {MAX_SECRET_BYTES} bytes",
            "Webhooks.SecretFile",
        )
    return secret


def treq_poster(reactor: Any) -> tuple[Poster, Callable[[], Deferred[None]]]:
    """A poster over treq with its own connection pool, and how to close it."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    client = HTTPClient(Agent(reactor, pool=pool, connectTimeout=30))

    def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Any:
        d = client.post(
            url,
            data=body,
            headers={k: [v] for k, v in headers.items()},
            timeout=timeout,
            reactor=reactor,
        )

        def answered(response: Any) -> Deferred[int]:
            # Read (and drop) the body, so the connection can be reused.
            return response.content().addCallback(lambda _: response.code)

        return d.addCallback(answered)

    return post, pool.closeCachedConnections


class DeliveryState(enum.Enum):
    """What one webhook is doing; one POST at a time."""

    IDLE = "idle"
    POSTING = "posting"
    #: Waiting to retry the event at the head of the queue.
    BACKING_OFF = "backing off"
    STOPPED = "stopped"


#: The moves a webhook's delivery may make.
MOVES: dict[DeliveryState, frozenset[DeliveryState]] = {
    DeliveryState.IDLE: frozenset({DeliveryState.POSTING, DeliveryState.STOPPED}),
    DeliveryState.POSTING: frozenset(
        {DeliveryState.IDLE, DeliveryState.BACKING_OFF, DeliveryState.STOPPED}
    ),
    DeliveryState.BACKING_OFF: frozenset(
        {DeliveryState.POSTING, DeliveryState.STOPPED}
    ),
    DeliveryState.STOPPED: frozenset(),
}


class Webhook:
    """One webhook's queue and delivery (a feed listener)."""

    def __init__(
        self,
        settings: WebhookSettings,
        feed: EventFeed,
        clock: IReactorTime,
        post: Poster,
        secret: bytes | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.label = settings.label
        self.feed = feed
        self.clock = clock
        self.post = post
        self.secret = secret
        self.wall_clock = wall_clock
        self.wants = matching(settings.events)
        self.state = DeliveryState.IDLE
        self.queue: deque[Event] = deque()
        #: Tries of the event at the head of the queue so far.
        self.attempts = 0
        # Counters (metrics).
        self.delivered = 0
        self.failed = 0
        self.retries = 0
        self.dropped = 0
        self._unreported_drops = 0
        self._report: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._in_flight: Deferred[int] | None = None
        self._stop_listening = feed.listen(self)

    def _move(self, state: DeliveryState) -> None:
        if state not in MOVES[self.state]:
            raise AssertionError(f"webhook {self.label}: no move to {state.value}")
        self.state = state

    # -- EventListener ---------------------------------------------------------

    def event(self, event: Event) -> None:
        """Queue an event this webhook wants (dropping the oldest past MaxQueue)."""
        if self.state is DeliveryState.STOPPED or not self.wants(event.type):
            return
        if len(self.queue) >= self.settings.max_queue:
            busy = self.state is not DeliveryState.IDLE
            if not busy:
                self._drop(self.queue.popleft())
            elif len(self.queue) > 1:
                # The head is being posted: the next oldest goes.
                self._drop(self.queue[1])
                del self.queue[1]
            else:
                self._drop(event)
                return
        self.queue.append(event)
        self._next()

    def feed_closed(self) -> None:
        """The gateway stops: no more posts."""
        self.stop()

    # -- delivery --------------------------------------------------------------

    def _next(self) -> None:
        if self.state is not DeliveryState.IDLE or not self.queue:
            return
        self._send(self.queue[0])

    def _send(self, event: Event) -> None:
        self._move(DeliveryState.POSTING)
        self.attempts += 1
        body = json.dumps(event.to_json(), separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "threshold-webhook",
            "X-Threshold-Event": event.type,
            "X-Threshold-Event-Id": str(event.id),
            "X-Threshold-Attempt": str(self.attempts),
        }
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, int(self.wall_clock()), body)
        try:
            d = self.post(
                self.settings.url, body, headers, self.settings.timeout_seconds
            )
        except Exception as e:  # a poster that cannot even start
            self._answered(None, f"{type(e).__name__}: {e}", event)
            return
        self._in_flight = d
        d.addCallbacks(
            lambda code: self._answered(code, None, event),
            lambda failure: self._answered(None, _why(failure), event),
        )

    def _answered(self, code: int | None, error: str | None, event: Event) -> None:
        self._in_flight = None
        if self.state is DeliveryState.STOPPED:
            return
        if code is not None and 200 <= code < 300:
            self.delivered += 1
            self._done()
            return
        why = error if code is None else f"answer {code}"
        retry = code is None or code >= 500 or code in _RETRIED
        if not retry or self.attempts >= self.settings.max_attempts:
            self.failed += 1
            log.warn(
                "webhook {label}: event {id} ({type}) given up after {attempts}"
                " tries: {why}",
                label=self.label,
                id=event.id,
                type=event.type,
                attempts=self.attempts,
                why=why,
            )
            self._done()
            return
        self.retries += 1
        delay = self.backoff(self.attempts)
        log.info(
            "webhook {label}: event {id} not delivered ({why}); try {next} in {delay}s",
            label=self.label,
            id=event.id,
            why=why,
            next=self.attempts + 1,
            delay=delay,
        )
        self._move(DeliveryState.BACKING_OFF)
        self._retry = self.clock.callLater(delay, self._retry_now)

    def backoff(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed try: doubled each time."""
        initial = self.settings.retry_initial_seconds
        return float(
            min(self.settings.retry_max_seconds, initial * 2 ** (attempts - 1))
        )

    def _retry_now(self) -> None:
        self._retry = None
        if self.state is DeliveryState.BACKING_OFF and self.queue:
            self._send(self.queue[0])

    def _done(self) -> None:
        if self.queue:
            self.queue.popleft()
        self.attempts = 0
        self._move(DeliveryState.IDLE)
        self._next()

    # -- drops -----------------------------------------------------------------

    def _drop(self, event: Event) -> None:
        self.dropped += 1
        if event.type == EventType.WEBHOOK_DROPPED:
            return  # never an event about dropping the drop events
        self._unreported_drops += 1
        if self._report is None:
            # Later, not inside the feed's own emit: every listener gets the
            # event that made the drop before the report of it.
            self._report = self.clock.callLater(0, self._report_drops)

    def _report_drops(self) -> None:
        count, self._unreported_drops = self._unreported_drops, 0
        if count == 0 or self.state is DeliveryState.STOPPED:
            self._report = None
            return
        self.feed.emit(
            EventType.WEBHOOK_DROPPED,
            Webhook=self.label,
            Dropped=count,
            DroppedTotal=self.dropped,
            MaxQueue=self.settings.max_queue,
        )
        # No other report for an interval; drops meanwhile are summed.
        self._report = self.clock.callLater(DROP_REPORT_INTERVAL, self._report_drops)

    # -- stop ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop posting: timers cancelled, the POST in flight abandoned."""
        if self.state is DeliveryState.STOPPED:
            return
        self._move(DeliveryState.STOPPED)
        self._stop_listening()
        for call in (self._retry, self._report):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._report = None
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            flight.cancel()

    def view(self) -> dict[str, Any]:
        """Counters for metrics."""
        return {
            "Webhook": self.label,
            "Queued": len(self.queue),
            "Delivered": self.delivered,
            "Failed": self.failed,
            "Retries": self.retries,
            "Dropped": self.dropped,
        }


def _why(failure: Any) -> str:
    error = failure.value
    name = type(error).__name__
    if name == "CancelledError":
        return "timed out"
    text = str(error)
    return f"{name}: {text}" if text else name


def build_webhooks(
    hooks: Sequence[WebhookSettings],
    feed: EventFeed,
    clock: IReactorTime,
    post: Poster,
    source: str = "server config",
) -> list[Webhook]:
    """One Webhook per entry, each with its secret read now (ConfigError if not)."""
    webhooks = []
    for hook in hooks:
        secret = read_secret(hook.secret_file, source) if hook.secret_file else None
        webhooks.append(Webhook(hook, feed, clock, post, secret))
        log.info(
            "webhook {label}: posting {events}{signed}",
            label=hook.label,
            events=", ".join(hook.events),
            signed="" if secret is not None else " UNSIGNED (no SecretFile)",
        )
        if secret is None:
            log.warn(
                "webhook {label} has no SecretFile: its receiver cannot tell the"
                " gateway's posts from anyone else's",
                label=hook.label,
            )
    return webhooks
