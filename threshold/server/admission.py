"""Shares of a bounded resource among sources, so one source cannot take it all.

Unauthenticated connections (a tunnel client's before its hello, a
management connection before its first request) are cheap to open and hold
a socket each. :class:`SourceShares` caps them in total and per source
(see :mod:`threshold.server.addresses` for what a source is). With
``evict`` set, a newcomer that finds the total full takes the slot of the
oldest connection of the source holding the most, when that source holds
at least two more than the newcomer's: many sources together can then
delay each other, but not lock out a source that holds few. Pure: no reactor.

A factory refuses with :class:`RefusedConnection`, not ``None``: under
TLS (``TLSMemoryBIOFactory`` wraps the factory) a ``None`` is not closed
but left open, unserved and untimed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

from twisted.internet.protocol import Protocol

__all__ = ["Admission", "Refusal", "RefusedConnection", "SourceShares"]

T = TypeVar("T")


class Refusal(enum.Enum):
    """Why a connection was not admitted."""

    #: The source holds its whole share.
    PER_SOURCE = "per_source"
    #: Every slot is taken and none may be taken back.
    TOTAL = "total"


@dataclass(frozen=True)
class Admission(Generic[T]):
    """The answer to :meth:`SourceShares.admit`."""

    admitted: bool
    #: Why not, when not admitted.
    refusal: Refusal | None = None
    #: A holder whose slot the newcomer took: the caller must close it.
    evicted: T | None = None


class SourceShares(Generic[T]):
    """Holders counted per source key, at most ``total`` and ``per_source``.

    ``per_source`` 0 means no per-source cap. Holders are any hashable
    objects (connections); a source's holders are kept oldest first.
    """

    def __init__(self, total: int, per_source: int, evict: bool = False) -> None:
        self.total = total
        self.per_source = per_source
        self.evict = evict
        # dicts as insertion-ordered sets: the first holder is the oldest.
        self._by_source: dict[str, dict[T, None]] = {}
        self._source_of: dict[T, str] = {}

    def __len__(self) -> int:
        return len(self._source_of)

    def count(self, source: str) -> int:
        """How many slots ``source`` holds."""
        return len(self._by_source.get(source, ()))

    def holders(self) -> list[T]:
        """Every holder, in no particular order."""
        return list(self._source_of)

    def admit(self, source: str, holder: T) -> Admission[T]:
        """Give ``holder`` a slot of ``source``'s share, or say why not."""
        held = self.count(source)
        if self.per_source and held >= self.per_source:
            return Admission(False, Refusal.PER_SOURCE)
        evicted: T | None = None
        if len(self._source_of) >= self.total:
            evicted = self._victim(held)
            if evicted is None:
                return Admission(False, Refusal.TOTAL)
            self.release(evicted)
        self._by_source.setdefault(source, {})[holder] = None
        self._source_of[holder] = source
        return Admission(True, evicted=evicted)

    def release(self, holder: T) -> None:
        """Give a slot back; releasing twice (or a stranger) does nothing."""
        source = self._source_of.pop(holder, None)
        if source is None:
            return
        held = self._by_source[source]
        del held[holder]
        if not held:
            del self._by_source[source]

    def _victim(self, newcomer_holds: int) -> T | None:
        """The oldest holder of the largest share, if it may be taken back."""
        if not self.evict or not self._by_source:
            return None
        largest = max(self._by_source.values(), key=len)
        # Taking a slot from a source barely larger than the newcomer's
        # would only swap who is short; at two more it narrows the gap.
        if len(largest) < newcomer_holds + 2:
            return None
        return next(iter(largest))


class RefusedConnection(Protocol):
    """What a factory builds for a connection it refuses: cut at once."""

    def connectionMade(self) -> None:  # noqa: N802
        """Abort: nothing is read, nothing is answered."""
        self.transport.abortConnection()
