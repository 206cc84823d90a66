"""A local copy of a key or a key range in etcd, kept current by a watch.

The mirror reads the range (a snapshot at one revision), then watches from
the next revision. When the watch reports compaction, or fails, it reads
again and reports only what differs from its copy, so a consumer sees
every change once and never one twice, whatever happened in between;
while etcd cannot be read it keeps its copy and tries again with backoff.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.cluster.kv import (
    Compacted,
    EtcdError,
    EtcdUnavailable,
    Event,
    EventType,
    KeyValue,
    RangeResult,
)
from threshold.cluster.watch import Watch, WatchBackoff, WatchState

__all__ = ["Mirror", "MirrorState", "Update"]

log = Logger()


class MirrorState(enum.Enum):
    READING = "reading"  # reading the snapshot
    WATCHING = "watching"  # a watch is running (it may be reconnecting)
    WAITING = "waiting"  # the read failed, trying again after a delay
    STOPPED = "stopped"


@dataclass(frozen=True)
class Update:
    """What changed: each key with its new KeyValue, or None once deleted.

    ``revision`` is the store revision the copy is now current at;
    ``resync`` is true for the changes found by a (re)read rather than seen
    by the watch (the first read, and after compaction or a failed watch).
    """

    changes: dict[bytes, KeyValue | None]
    revision: int
    resync: bool


class Mirror:
    """Keep ``kvs`` equal to etcd's keys at ``key`` (a prefix unless not)."""

    def __init__(
        self,
        client: Any,
        reactor: Any,
        key: bytes,
        on_update: Callable[[Update], object],
        *,
        prefix: bool = True,
        backoff: WatchBackoff | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self._client = client
        self._reactor = reactor
        self.key = key
        self.prefix = prefix
        self._on_update = on_update
        self._backoff = backoff or backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self._idle_timeout = idle_timeout
        self.kvs: dict[bytes, KeyValue] = {}
        #: The store revision ``kvs`` is current at (0 before the first read).
        self.revision = 0
        self.state = MirrorState.WAITING
        self.watch: Watch | None = None
        self.last_error: str | None = None
        #: Reads after the first one (compaction, failed watch).
        self.resyncs = 0
        self._failures = 0
        self._reading: Deferred[RangeResult] | None = None
        self._timer: IDelayedCall | None = None
        self._ready: list[Deferred[None]] = []

    @property
    def connected(self) -> bool:
        """True while a watch stream is up (changes arrive as they happen)."""
        return self.watch is not None and self.watch.state is WatchState.WATCHING

    def ready(self) -> Deferred[None]:
        """Fires once the first read has been reported."""
        if self.revision:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready.append(d)
        return d

    def start(self) -> None:
        self._read()

    def stop(self) -> None:
        if self.state is MirrorState.STOPPED:
            return
        self.state = MirrorState.STOPPED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.cancel()

    # -- reading ---------------------------------------------------------------

    def _read(self) -> None:
        self.state = MirrorState.READING
        if self.prefix:
            reading = self._client.get_prefix(self.key)
        else:
            reading = self._client.get(self.key)
        self._reading = reading
        reading.addCallbacks(self._snapshot, self._read_failed)

    def _read_failed(self, failure: Failure) -> None:
        if self.state is MirrorState.STOPPED:
            return
        self._reading = None
        if not failure.check(EtcdUnavailable, EtcdError):
            log.failure("etcd mirror {key}: read failed", failure, key=self.key)
        self._wait(failure.getErrorMessage())

    def _wait(self, why: str) -> None:
        self.last_error = why
        self.state = MirrorState.WAITING
        delay = self._backoff(self._failures)
        self._failures += 1
        self._timer = self._reactor.callLater(delay, self._read)

    def _snapshot(self, result: RangeResult) -> None:
        if self.state is MirrorState.STOPPED:
            return
        self._reading = None
        self._failures = 0
        self.last_error = None
        first = not self.revision
        if not first:
            self.resyncs += 1
        fresh = {kv.key: kv for kv in result.kvs}
        changes: dict[bytes, KeyValue | None] = {}
        for key, kv in fresh.items():
            old = self.kvs.get(key)
            if old is None or old.mod_revision != kv.mod_revision:
                changes[key] = kv
        for key in self.kvs.keys() - fresh.keys():
            changes[key] = None
        self.kvs = fresh
        self.revision = result.revision
        self.state = MirrorState.WATCHING
        self.watch = self._client.watch(
            self.key,
            result.revision + 1,
            self._event,
            prefix=self.prefix,
            backoff=self._backoff,
            idle_timeout=self._idle_timeout,
        )
        self.watch.done.addErrback(self._watch_ended, self.watch)
        if changes or first:
            self._report(Update(changes, result.revision, resync=True))
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(None)

    # -- watching --------------------------------------------------------------

    def _event(self, event: Event) -> None:
        key = event.kv.key
        self.revision = max(self.revision, event.revision)
        if event.type is EventType.PUT:
            self.kvs[key] = event.kv
            self._report(Update({key: event.kv}, event.revision, resync=False))
        elif self.kvs.pop(key, None) is not None:
            self._report(Update({key: None}, event.revision, resync=False))

    def _watch_ended(self, failure: Failure, watch: Watch) -> None:
        if self.state is MirrorState.STOPPED or watch is not self.watch:
            return
        self.watch = None
        if failure.check(Compacted):
            log.info(
                "etcd mirror {key}: {why}; reading again",
                key=self.key,
                why=failure.value,
            )
            self._read()
        else:
            log.failure("etcd mirror {key}: watch failed", failure, key=self.key)
            self._wait(failure.getErrorMessage())

    def _report(self, update: Update) -> None:
        # A consumer's error is its own: log it, keep the copy going.
        try:
            self._on_update(update)
        except Exception:
            log.failure("etcd mirror {key}: consumer failed", key=self.key)
