"""Helpers for tests against a real etcd: waiting for events, with bounds."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task

from threshold.cluster.kv import Event, EventType

__all__ = ["Collector", "sleep", "unique_prefix", "wait_until"]

#: The longest a test waits for something etcd should do at once.
WAIT = 10.0


def unique_prefix() -> str:
    """A key prefix no other test uses (the shared member holds them all)."""
    return f"/test/{uuid.uuid4().hex}/"


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_until(
    predicate: Callable[[], Any], what: str, timeout: float = WAIT
) -> None:
    """Check ``predicate`` every 20 ms until true; fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.02)


def _fire(d: defer.Deferred[None]) -> None:
    if not d.called:  # not timed out meanwhile
        d.callback(None)


class Collector:
    """A watch callback that records events and wakes whoever waits for them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        for n, d in list(self._waiting):
            if len(self.events) >= n:
                self._waiting.remove((n, d))
                # Not from inside the watch's callback: the waiter then sees
                # the watch as it is after the event.
                reactor.callLater(0, _fire, d)

    def wait_for(self, n: int, timeout: float = WAIT) -> defer.Deferred[None]:
        """Fires once ``n`` events in all have arrived (fails after timeout)."""
        if len(self.events) >= n:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((n, d))
        return d.addTimeout(timeout, reactor)

    def summary(self) -> list[tuple[str, bytes, bytes]]:
        """``(type, key, value)`` of every event, for assertions."""
        return [
            (e.type.value, e.kv.key, e.kv.value if e.type is EventType.PUT else b"")
            for e in self.events
        ]
