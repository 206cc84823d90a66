"""How much receive window streams may grow to, together: a shared budget.

Every stream opens with the 256 KiB window of the yamux spec, which is never
taken back. Auto-tuning (below) grows the window of a stream whose reader
keeps up, so that one long-distance stream is not held to 256 KiB per round
trip; but every byte of window granted is a byte a reader that stops can
pin in memory. So growth beyond the initial window is drawn from a
:class:`WindowBudget`: one per session, inside an optional one shared by a
whole gateway, as QUIC bounds its streams by a connection-level window and
the kernel bounds its sockets' buffers by ``tcp_mem``.

- A window grows only by what every level of the budget has free, and past
  its fair share (below) only while the budget stays under 7/8 used.
- Under pressure (a level more than 7/8 used), a stream whose extra window
  is above its fair share (the level's size over its claimants, the streams
  whose readers kept up at their last grant) halves it at its next grant,
  down to 256 KiB at least: windows can only shrink by granting less than
  was read, so grants simply stop short.
- A stalled stream keeps what it holds (it cannot be revoked) but gets no
  more, so what all stalled streams hold is at most their initial windows
  plus the budget.

The peer controls the round trip we measure (it chooses when to answer a
Ping), so auto-tuning uses the smallest RTT of the recent ones, and the
budget, not the RTT, is what bounds a peer that lies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from threshold.mux.settings import INITIAL_WINDOW

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

_MIB = 1024 * 1024

#: Default for a gateway-wide budget shared by every client session
#: (4 sessions' worth of the per-session default).
GATEWAY_WINDOW_BUDGET = 256 * _MIB


class WindowBudget:
    """Bytes of receive window, beyond each stream's initial window, to share.

    ``limit`` is this level's size; ``parent`` an enclosing budget (a
    gateway's) that every take is also drawn from. ``used`` and
    ``claimants`` (streams that want a share) are read by metrics and tests.
    """

    __slots__ = ("limit", "parent", "used", "claimants")

    def __init__(self, limit: int, parent: WindowBudget | None = None) -> None:
        if limit < 0:
            raise ValueError("a window budget cannot be negative")
        self.limit = limit
        self.parent = parent
        self.used = 0
        self.claimants = 0

    def __repr__(self) -> str:
        return f"<WindowBudget {self.used}/{self.limit}, {self.claimants} claimants>"

    def available(self) -> int:
        """What may still be taken here and at every enclosing level."""
        free = self.limit - self.used
        parent = self.parent
        while parent is not None:
            free = min(free, parent.limit - parent.used)
            parent = parent.parent
        return max(free, 0)

    def headroom(self) -> int:
        """What may be taken before this level or an enclosing one is under
        pressure (more than 7/8 used)."""
        room = self.limit * 7 // 8 - self.used
        parent = self.parent
        while parent is not None:
            room = min(room, parent.limit * 7 // 8 - parent.used)
            parent = parent.parent
        return max(room, 0)

    def under_pressure(self) -> bool:
        """True when this level or an enclosing one is more than 7/8 used."""
        level: WindowBudget | None = self
        while level is not None:
            if level.used * 8 > level.limit * 7:
                return True
            level = level.parent
        return False

    def fair_share(self) -> int:
        """The smallest share per claimant of any level."""
        share = self.limit // max(self.claimants, 1)
        parent = self.parent
        while parent is not None:
            share = min(share, parent.limit // max(parent.claimants, 1))
            parent = parent.parent
        return share

    def change(self, held: int, new: int) -> None:
        """A stream's extra window goes from ``held`` to ``new`` bytes.

        The caller has checked ``available()`` for a growth.
        """
        delta = new - held
        level: WindowBudget | None = self
        while level is not None:
            level.used += delta
            level = level.parent

    def claim(self, count: int) -> None:
        """``count`` more (or, negative, fewer) streams want a share."""
        level: WindowBudget | None = self
        while level is not None:
            level.claimants += count
            level = level.parent


def next_window(
    budget: WindowBudget,
    window: int,
    max_window: int,
    drained_fast: bool,
) -> int:
    """The window a stream should have after its reader drained a share.

    ``drained_fast``: the reader drained its share in well under two round
    trips, so the window, not the reader, limits throughput.
    """
    extra = window - INITIAL_WINDOW
    if extra > 0 and budget.under_pressure() and extra > budget.fair_share():
        return max(INITIAL_WINDOW, window // 2)
    if not drained_fast or window >= max_window:
        return window
    share = budget.fair_share()
    # Doubling, as QUIC stacks and gRPC's BDP estimator do, or what the
    # budget still has if that is less.
    grow = min(window, max_window - window, budget.available())
    if extra + grow > share:
        # Past its fair share a window grows only below the pressure line,
        # so that streams below theirs always find room.
        grow = min(grow, max(budget.headroom(), share - extra))
    return window + grow


class ReceiveWindow:
    """One stream's receive window: its size, the credit left, bytes read.

    ``size`` starts at 256 KiB and is grown (or shrunk back) within
    ``budget``, up to ``max_window``, each time the reader has consumed
    half of it, which is also when the consumed bytes are granted back.
    """

    __slots__ = (
        "_budget",
        "_clock",
        "_max",
        "size",
        "left",
        "consumed",
        "_epoch_start",
        "_claimed",
    )

    def __init__(
        self, budget: WindowBudget, clock: IReactorTime, max_window: int
    ) -> None:
        self._budget = budget
        self._clock = clock
        self._max = max_window
        self.size = INITIAL_WINDOW
        self.left = INITIAL_WINDOW
        #: Bytes handed on since the last grant (the stream counts them).
        self.consumed = 0
        self._epoch_start = clock.seconds()
        #: Counted among the budget's claimants (its reader kept up at the
        #: last grant), so that a full budget makes room for it.
        self._claimed = False

    def grant(self, rtt: float | None) -> int:
        """The reader has consumed half the window (``consumed``): resize the
        window and return the Window Update delta due (0: none).

        ``rtt`` is the session's smallest recent round trip.
        """
        now = self._clock.seconds()
        size = self.size
        # Auto-tuning as QUIC stacks do: a reader that drained this share of
        # the window in well under two round trips is held back by the
        # window, not by itself.
        fast = rtt is not None and now - self._epoch_start < (
            4 * self.consumed / size * rtt
        )
        budget = self._budget
        if fast != self._claimed:
            self._claimed = fast
            budget.claim(1 if fast else -1)
        new = next_window(budget, size, self._max, fast)
        if new != size:
            budget.change(size - INITIAL_WINDOW, new - INITIAL_WINDOW)
            self.size = new
        # Shrinking grants less than was read (what was read less half the
        # window: at least 0, as half the window was read).
        delta = self.consumed + new - size
        self._epoch_start = now
        self.consumed = 0
        self.left += delta
        return delta

    def release(self) -> None:
        """The stream ended: give its extra window back to the budget."""
        if self.size > INITIAL_WINDOW:
            self._budget.change(self.size - INITIAL_WINDOW, 0)
            self.size = INITIAL_WINDOW
        if self._claimed:
            self._claimed = False
            self._budget.claim(-1)
