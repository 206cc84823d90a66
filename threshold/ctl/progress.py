"""Progress of a long operation on stderr, for people: bytes sent, waiting, elapsed.

A request's bytes (:class:`Progress`, ``tunnels put``) or a walk's items
(:class:`Steps`, ``doctor``'s tunnels).

Only when stderr is a terminal: a script's stderr stays the one error line
docs/ctl.md promises. The line is redrawn in place every
:data:`INTERVAL` seconds, first after :data:`INTERVAL` (a quick call shows
nothing), and erased when the call ends.
"""

from __future__ import annotations

import enum
from typing import IO, Any

from twisted.internet.task import LoopingCall

from threshold.ctl.output import human_bytes

#: Seconds between two redraws (and before the first).
INTERVAL = 0.25
#: Back to the start of the line, and erase it to its end (VT100).
_REDRAW = "\r\x1b[K"


class Phase(enum.Enum):
    """Where the request is; moves forward only."""

    SENDING = 1
    WAITING = 2
    RECEIVING = 3
    DONE = 4


class _Redrawn:
    """A line on a terminal, redrawn every INTERVAL from :meth:`line`."""

    def __init__(self, stream: IO[str], clock: Any, what: str) -> None:
        self._stream = stream
        self._clock = clock
        self._what = what
        self._started = clock.seconds()
        self._drawn = False
        self._stopped = False
        self._loop = LoopingCall(self._draw)
        self._loop.clock = clock
        self._loop.start(INTERVAL, now=False)

    def _elapsed(self) -> str:
        return f"{self._clock.seconds() - self._started:.1f} s"

    def line(self) -> str:
        raise NotImplementedError

    def _draw(self) -> None:
        self._stream.write(_REDRAW + self.line())
        self._stream.flush()
        self._drawn = True

    def _stop(self) -> None:
        """Stop and erase the line (before any other output)."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._drawn:
            self._stream.write(_REDRAW)
            self._stream.flush()


class Progress(_Redrawn):
    """Counts a request's bytes and shows them; see :func:`progress_for`."""

    def __init__(self, stream: IO[str], clock: Any, what: str, total: int) -> None:
        self._total = total
        self.phase = Phase.SENDING
        self.sent = 0
        self.received = 0
        super().__init__(stream, clock, what)

    def _move(self, phase: Phase) -> None:
        if phase.value > self.phase.value:
            self.phase = phase

    def on_sent(self, count: int) -> None:
        """``count`` more bytes of the body went out."""
        self.sent += count
        if self._total and self.sent >= self._total:
            self._move(Phase.WAITING)

    def on_answer(self) -> None:
        """The answer's head arrived; its body follows."""
        self._move(Phase.RECEIVING)

    def on_received(self, count: int) -> None:
        """``count`` more bytes of the answer's body arrived."""
        self.received += count

    def line(self) -> str:
        """What the progress line says now."""
        elapsed = self._elapsed()
        if self.phase is Phase.SENDING:
            share = f" ({100 * self.sent // self._total}%)" if self._total else ""
            size = f"{human_bytes(self.sent)} of {human_bytes(self._total)}"
            return f"{self._what}: sending {size}{share}, {elapsed}"
        if self.phase is Phase.WAITING:
            return (
                f"{self._what}: sent {human_bytes(self.sent)}, waiting for the"
                f" answer, {elapsed}"
            )
        received = human_bytes(self.received)
        return f"{self._what}: receiving the answer, {received}, {elapsed}"

    def done(self) -> None:
        """Stop and erase the line (before any other output)."""
        self.phase = Phase.DONE
        self._stop()


class Steps(_Redrawn):
    """Counts the items of a long walk (doctor's tunnels) and shows them."""

    def __init__(self, stream: IO[str], clock: Any, what: str, total: int) -> None:
        self._total = total
        self.finished = 0
        super().__init__(stream, clock, what)

    def step(self) -> None:
        """One more item is done."""
        self.finished += 1

    def line(self) -> str:
        return f"{self._what}: {self.finished} of {self._total}, {self._elapsed()}"

    def done(self) -> None:
        """Stop and erase the line (before any other output)."""
        self._stop()


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return isatty is not None and bool(isatty())
    except ValueError:  # a closed stream
        return False


def steps_for(stream: IO[str], clock: Any, what: str, total: int) -> Steps | None:
    """A :class:`Steps` line on ``stream`` if it is a terminal, else None."""
    return Steps(stream, clock, what, total) if _is_terminal(stream) else None


def progress_for(stream: IO[str], clock: Any, what: str, total: int) -> Progress | None:
    """A :class:`Progress` on ``stream`` if it is a terminal, else None."""
    return Progress(stream, clock, what, total) if _is_terminal(stream) else None
