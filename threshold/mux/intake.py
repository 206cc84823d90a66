"""Reading a session's input a bounded slice per turn of the reactor.

One reactor serves every connection of the process, so a peer that sends a
flood of small frames (a 64 KiB read holds 5,461 Pings or SYNs) must not
make every other connection wait while all of it is acted on. The session
decodes at most :data:`FRAMES_PER_SLICE` frames at a time; what is left
waits, with the transport's reading paused, for a ``callLater(0)``, which
the reactor runs after serving the other connections. Nothing is dropped
and the order is kept: bytes that arrive meanwhile (a TLS transport hands
over a whole read even once paused) queue behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime

#: Frames one session decodes per turn of the reactor. A 64 KiB read of
#: small frames (64-byte writes) is two slices; a read of SYNs or Pings
#: is eleven, each a few milliseconds of work at most.
FRAMES_PER_SLICE = 512


class SlicedInput:
    """The input side of one session.

    ``decode(data)`` acts on a slice of ``data`` and returns the bytes left
    over (none once the session stops reading); ``transport`` is the
    producer whose reading is paused between slices.
    """

    def __init__(self, clock: IReactorTime, decode: Callable[[bytes], bytes]) -> None:
        self._clock = clock
        self._decode = decode
        self.transport: IPushProducer | None = None
        self._backlog: list[bytes] = []
        self._call: IDelayedCall | None = None
        self._paused = False
        self._stopped = False

    def data_received(self, data: bytes) -> None:
        """Decode a slice now; leave the rest for the next turn."""
        if self._stopped:
            return
        if self._call is not None:
            self._backlog.append(data)  # behind already: keep the order
            return
        rest = self._decode(data)
        if rest and not self._stopped:
            self._backlog.append(rest)
            self.pause_reading()
            self._call = self._clock.callLater(0, self._next_slice)

    def stop(self) -> None:
        """Act on nothing more, not even what is already queued."""
        self._stopped = True
        self._backlog.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def pause_reading(self) -> None:
        """Stop the transport's reading (between slices, or for good)."""
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Let the transport read again, if it was paused here."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def _next_slice(self) -> None:
        self._call = None
        data = b"".join(self._backlog)
        self._backlog.clear()
        rest = self._decode(data)
        if rest and not self._stopped:
            self._backlog.append(rest)
            self._call = self._clock.callLater(0, self._next_slice)
        elif not self._stopped:
            self.resume_reading()
