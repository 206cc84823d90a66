"""What a client says on the control channel after its hello is accepted.

One :class:`ControlLines` per accepted session reads the lines of stream 1
(:mod:`threshold.wire.control`): a health message goes to the registry,
which keeps the latest for the session; a message of a kind this gateway
does not know is ignored; a malformed line is ignored and logged, at most
once per :data:`MALFORMED_LOG_INTERVAL` per session, so a broken client
cannot flood the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from threshold.logs import observer as log_observer
from threshold.wire.control import ControlError, Health, parse_control_line
from threshold.wire.handshake import MAX_LINE

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from threshold.mux.session import MuxSession
    from threshold.server.registry import ClientRegistry

__all__ = ["MALFORMED_LOG_INTERVAL", "ControlLines"]

log = Logger(observer=log_observer)

#: A session's malformed control lines are logged at most this often.
MALFORMED_LOG_INTERVAL = 60.0


class ControlLines:
    """The control lines of one client's session."""

    def __init__(
        self,
        registry: ClientRegistry,
        client_id: str,
        session: MuxSession,
        clock: IReactorTime,
    ) -> None:
        self.registry = registry
        self.client_id = client_id
        self.session = session
        self.clock = clock
        #: When a malformed line was last logged, and how many were not since.
        self._logged_at: float | None = None
        self._unlogged = 0
        #: Lines that were not understood (malformed or too long).
        self.malformed = 0

    def line_received(self, line: bytes) -> None:
        """One line (without its newline)."""
        try:
            message = parse_control_line(line)
        except ControlError as e:
            self._malformed(str(e))
            return
        if isinstance(message, Health):
            self.registry.health_reported(self.client_id, self.session, message)
        else:
            log.debug(
                "{name}: control message with keys {keys} ignored (unknown kind)",
                name=self.session.name,
                keys=", ".join(message.keys),
            )

    def line_too_long(self) -> None:
        """No newline within MAX_LINE: the caller resets stream 1."""
        self.malformed += 1
        log.warn(
            "{name}: control line longer than {limit} bytes; stream 1 reset, "
            "health stays as last reported",
            name=self.session.name,
            limit=MAX_LINE,
        )

    def _malformed(self, why: str) -> None:
        self.malformed += 1
        now = self.clock.seconds()
        last = self._logged_at
        if last is not None and now - last < MALFORMED_LOG_INTERVAL:
            self._unlogged += 1
            return
        unlogged, self._unlogged = self._unlogged, 0
        self._logged_at = now
        log.warn(
            "{name}: malformed control line ignored: {why}{more}",
            name=self.session.name,
            why=why,
            more=f" ({unlogged} more not logged since the last)" if unlogged else "",
        )
