"""Ping on a session: our keepalive and RTT measure, our answers to the peer.

We send a Ping (SYN) at once, which measures the round trip auto-tuning
needs, then one every ``keepalive_interval`` after each answer; a Ping left
unanswered for ``keepalive_timeout`` means the session is dead. The peer's
Pings are answered with the same value, but only the latest of those that
arrive together (in one slice of input, or while our transport is full), so
a Ping flood costs one answer per turn, not one per Ping.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from threshold.wire.frames import (
    FLAG_ACK,
    FLAG_SYN,
    MAX_UINT32,
    TYPE_PING,
    encode_header,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from threshold.mux.settings import SessionConfig

#: Round trips kept for the minimum (at the default interval, 4 minutes'
#: worth): the peer chooses when to answer, so one slow answer must not
#: inflate the RTT auto-tuning works from, and a longer path is learned
#: once the shorter samples age out.
RTT_SAMPLES = 8


class Keepalive:
    """The Ping side of one session.

    ``write(frame)`` sends a frame; ``dead()`` is called when a Ping went
    unanswered for the timeout.
    """

    def __init__(
        self,
        clock: IReactorTime,
        config: SessionConfig,
        write: Callable[[bytes], None],
        dead: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._config = config
        self._write = write
        self._dead = dead
        self._ping_id = 0
        self._sent_at: float | None = None
        self._next_call: IDelayedCall | None = None
        self._timeout_call: IDelayedCall | None = None
        self._samples: deque[float] = deque(maxlen=RTT_SAMPLES)
        #: The value of the latest Ping not answered yet.
        self.answer_due: int | None = None
        #: The latest round trip measured (seconds), None before the first.
        self.rtt: float | None = None
        #: The smallest of the recent round trips, None before the first.
        self.min_rtt: float | None = None

    def start(self) -> None:
        """Send the first Ping, unless keepalive is off."""
        if self._config.keepalive_interval > 0:
            self._send_ping()

    def stop(self) -> None:
        """The session is over: no more Pings or timeouts."""
        for call in (self._next_call, self._timeout_call):
            if call is not None and call.active():
                call.cancel()
        self._next_call = self._timeout_call = None
        self.answer_due = None

    def ping_received(self, flags: int, value: int) -> None:
        """A Ping from the peer: a question to answer, or the answer to ours."""
        if flags & FLAG_SYN:
            self.answer_due = value
        elif flags & FLAG_ACK:
            self._answered(value)

    def send_answer(self) -> None:
        """Answer the latest Ping not answered yet (when the transport has room)."""
        if self.answer_due is not None:
            value, self.answer_due = self.answer_due, None
            self._write(encode_header(TYPE_PING, FLAG_ACK, 0, value))

    def _answered(self, value: int) -> None:
        if self._sent_at is None or value != self._ping_id:
            return
        self.rtt = self._clock.seconds() - self._sent_at
        self._samples.append(self.rtt)
        self.min_rtt = min(self._samples)
        self._sent_at = None
        if self._timeout_call is not None:
            if self._timeout_call.active():
                self._timeout_call.cancel()
            self._timeout_call = None
        self._next_call = self._clock.callLater(
            self._config.keepalive_interval, self._send_ping
        )

    def _send_ping(self) -> None:
        self._next_call = None
        self._ping_id = (self._ping_id + 1) & MAX_UINT32
        self._sent_at = self._clock.seconds()
        self._write(encode_header(TYPE_PING, FLAG_SYN, 0, self._ping_id))
        self._timeout_call = self._clock.callLater(
            self._config.keepalive_timeout, self._expired
        )

    def _expired(self) -> None:
        self._timeout_call = None
        self._dead()
