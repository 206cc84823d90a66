"""One etcd watch, kept up across stream ends, etcd restarts and failover.

The gateway's ``/v3/watch`` answers one JSON message per line for as long
as the HTTP response lasts: first ``created``, then batches of events,
progress notices (no events: everything up to the header's revision has
been sent) and at the end possibly ``canceled`` with ``compact_revision``
when the revision asked for is compacted away.

The watch remembers the next revision it needs. When the stream ends or
fails it waits (backoff), opens a new one from that revision on the next
endpoint that answers, and drops any event older than that revision, so
the callback sees every change once, in order. It ends only by
``cancel()`` (``done`` fires None), by compaction (``done`` fails with
:class:`Compacted`: read the state again and watch from that read) or by
an exception of the callback (``done`` fails with it; ``next_revision``
is then the revision of the event that raised).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from threshold.cluster.kv import (
    Compacted,
    EtcdError,
    Event,
    b64,
    header_revision,
    int_field,
)

__all__ = ["EventCallback", "Watch", "WatchBackoff", "WatchState"]

log = Logger()

EventCallback = Callable[[Event], object]
#: attempt number (0 for the first retry) -> seconds to wait.
WatchBackoff = Callable[[int], float]

#: The longest line (one watch answer) read; events carry whole values.
MAX_LINE_BYTES = 64 * 1024 * 1024


class WatchState(enum.Enum):
    CONNECTING = "connecting"  # opening a stream, until etcd says "created"
    WATCHING = "watching"
    WAITING = "waiting"  # between attempts, backing off
    STOPPED = "stopped"


_TRANSITIONS = {
    WatchState.CONNECTING: {
        WatchState.WATCHING,
        WatchState.WAITING,
        WatchState.STOPPED,
    },
    WatchState.WATCHING: {WatchState.WAITING, WatchState.STOPPED},
    WatchState.WAITING: {WatchState.CONNECTING, WatchState.STOPPED},
    WatchState.STOPPED: set(),
}


class StreamOpener(TypingProtocol):
    """What a watch needs from the client."""

    timeout: float

    async def open_stream(
        self, path: str, body: dict[str, Any]
    ) -> tuple[str, IResponse]: ...

    def demote(self, endpoint: str) -> None: ...


class _Lines(Protocol):
    """Split a streamed response into lines for the watch (bounded)."""

    def __init__(self, watch: Watch, generation: int) -> None:
        self._watch = watch
        self._generation = generation
        self._buffer = b""
        self._stopped = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE_BYTES:
            self._buffer = b""
            self.stop()
            self._watch._stream_failed(
                self._generation, f"a watch answer over {MAX_LINE_BYTES} bytes"
            )
            return
        for line in lines:
            if line.strip() and not self._watch._line(self._generation, line):
                self.stop()
                return

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._watch._stream_failed(self._generation, f"stream ended: {why}")

    def stop(self) -> None:
        if not self._stopped and self.transport is not None:
            self._stopped = True
            self.transport.stopProducing()


class Watch:
    """A watch on a key or key range; started by ``EtcdClient.watch``."""

    def __init__(
        self,
        client: StreamOpener,
        reactor: Any,
        key: bytes,
        range_end: bytes | None,
        start_revision: int,
        callback: EventCallback,
        *,
        backoff: WatchBackoff | None = None,
        idle_timeout: float | None = None,
        on_state: Callable[[Watch], object] | None = None,
    ) -> None:
        self._client = client
        self._reactor = reactor
        self._key = key
        self._range_end = range_end
        self._callback = callback
        self._backoff = backoff or backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self._idle_timeout = idle_timeout
        self.on_state = on_state
        #: The first revision not yet delivered (0: "from now", until created).
        self.next_revision = start_revision
        self.state = WatchState.WAITING
        self.endpoint: str | None = None
        self.last_error: str | None = None
        #: Streams opened; how many attempts failed in a row.
        self.streams = 0
        self.failures = 0
        self.done: Deferred[None] = Deferred()
        self._generation = 0
        self._opening: Deferred[tuple[str, IResponse]] | None = None
        self._stream: _Lines | None = None
        self._timer: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<Watch {self._key!r} {self.state.value} next={self.next_revision}>"

    # -- state -------------------------------------------------------------

    def _enter(self, state: WatchState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise AssertionError(f"watch: {self.state} -> {state}")
        self.state = state
        if self.on_state is not None:
            self.on_state(self)

    def _set_timer(self, seconds: float | None, fn: Callable[[], object]) -> None:
        self._clear_timer()
        if seconds is not None:
            self._timer = self._reactor.callLater(seconds, fn)

    def _clear_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _drop_stream(self) -> None:
        self._generation += 1
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()

    # -- life --------------------------------------------------------------

    def start(self) -> None:
        self._connect()

    def cancel(self) -> None:
        """Stop watching; ``done`` fires None."""
        self._stop(None)

    def _stop(self, failure: Failure | None) -> None:
        if self.state is WatchState.STOPPED:
            return
        self._clear_timer()
        self._drop_stream()
        self._enter(WatchState.STOPPED)
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)

    def _connect(self) -> None:
        self._enter(WatchState.CONNECTING)
        self._drop_stream()
        generation = self._generation
        request: dict[str, Any] = {"key": b64(self._key), "progress_notify": True}
        if self._range_end is not None:
            request["range_end"] = b64(self._range_end)
        if self.next_revision:
            request["start_revision"] = str(self.next_revision)
        opening = Deferred.fromCoroutine(
            self._client.open_stream("/watch", {"create_request": request})
        )
        self._opening = opening
        opening.addCallbacks(
            self._opened, self._open_failed, (generation,), None, (generation,)
        )
        # etcd says "created" at once; a stream that does not is dead.
        self._set_timer(self._client.timeout, lambda: self._no_answer(generation))

    def _opened(self, result: tuple[str, IResponse], generation: int) -> None:
        if generation != self._generation:
            return
        self._opening = None
        self.endpoint, response = result
        self.streams += 1
        self._stream = _Lines(self, generation)
        response.deliverBody(self._stream)

    def _open_failed(self, failure: Failure, generation: int) -> None:
        if generation != self._generation or failure.check(CancelledError):
            return
        self._opening = None
        self._retry(failure.getErrorMessage())

    def _no_answer(self, generation: int) -> None:
        if generation == self._generation:
            if self.endpoint is not None:
                self._client.demote(self.endpoint)
            self._retry(f"no answer from etcd within {self._client.timeout:g} s")

    def _idle(self, generation: int) -> None:
        if generation == self._generation and self.endpoint is not None:
            self._client.demote(self.endpoint)
            self._retry(f"no message for {self._idle_timeout:g} s")

    def _stream_failed(self, generation: int, why: str) -> None:
        if generation == self._generation:
            self._stream = None
            self._retry(why)

    def _retry(self, why: str) -> None:
        """Drop the stream and open another after the backoff delay."""
        if self.state is WatchState.STOPPED:
            return
        self.last_error = why
        self._drop_stream()
        delay = self._backoff(self.failures)
        self.failures += 1
        log.info(
            "etcd watch {key}: {why}; again in {delay:.2f} s from revision {rev}",
            key=self._key,
            why=why,
            delay=delay,
            rev=self.next_revision,
        )
        self._enter(WatchState.WAITING)
        self._set_timer(delay, self._connect)

    # -- messages ------------------------------------------------------------

    def _line(self, generation: int, line: bytes) -> bool:
        """Handle one message; False when the stream must be dropped."""
        if generation != self._generation:
            return False
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            if "error" in message:
                err = message["error"]
                text = err.get("message") if isinstance(err, dict) else err
                self._retry(f"etcd: {text}")
                return False
            result = message.get("result")
            if not isinstance(result, dict):
                raise ValueError("no result")
            revision = header_revision(result)
            events = [Event.from_json(e) for e in result.get("events", [])]
            compact_revision = int_field(result, "compact_revision")
        except ValueError as e:
            self._retry(f"malformed watch answer: {e}")
            return False
        self._set_timer(self._idle_timeout, lambda: self._idle(generation))
        if result.get("created"):
            if self.state is WatchState.CONNECTING:
                self._enter(WatchState.WATCHING)
                self.failures = 0
                self.last_error = None
                # Without a start revision etcd watches from revision + 1.
                if not self.next_revision:
                    self.next_revision = revision + 1
        if result.get("canceled"):
            if compact_revision:
                self._stop(Failure(Compacted(compact_revision)))
            else:
                reason = result.get("cancel_reason") or "canceled by etcd"
                self._retry(str(EtcdError(self.endpoint or "?", None, reason)))
            return False
        if events:
            return self._deliver(events)
        if not result.get("created") and revision >= self.next_revision:
            self.next_revision = revision + 1  # progress: nothing before it
        return True

    def _deliver(self, events: list[Event]) -> bool:
        for i, event in enumerate(events):
            if event.revision < self.next_revision:
                continue  # seen before this stream began
            try:
                self._callback(event)
            except Exception:
                # Not delivered: a new watch from here sees it again.
                self.next_revision = max(self.next_revision, event.revision)
                self._stop(Failure())
                return False
            # A revision is done once its last event (a transaction may
            # change several keys at one revision) has been delivered.
            last = i + 1 == len(events) or events[i + 1].revision != event.revision
            if last:
                self.next_revision = event.revision + 1
        return True
