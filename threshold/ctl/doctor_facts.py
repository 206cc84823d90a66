"""What ``threshold-ctl doctor`` finds, as data: probe results and findings.

The probes (:mod:`threshold.ctl.doctor_probe`) return :class:`Resolution`,
:class:`Connect` and :class:`Answer`; the judges
(:mod:`threshold.ctl.doctor_words`) turn them into :class:`Finding`\\ s.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from threshold.ctl.errors import EXIT_OK

#: Exit statuses of ``doctor`` besides ctl's own (errors.py): some check
#: warned (and none is broken), or some link is broken.
EXIT_WARNING = 4
EXIT_BROKEN = 5


class Level(enum.IntEnum):
    """How bad a finding is; a report is as bad as its worst finding."""

    OK = 0
    #: Could not be checked (says why); does not change the exit status.
    SKIPPED = 1
    WARNING = 2
    BROKEN = 3

    @property
    def word(self) -> str:
        """The level as JSON and the table write it."""
        return self.name.lower()

    @property
    def exit_status(self) -> int:
        """What ``doctor`` exits with when this is the worst finding."""
        if self is Level.BROKEN:
            return EXIT_BROKEN
        if self is Level.WARNING:
            return EXIT_WARNING
        return EXIT_OK


class Check(enum.StrEnum):
    """The checks, in the order a user's connection meets them."""

    API = "api"
    RESTORE = "restore"
    DNS = "dns"
    PORT = "port"
    CLIENT = "client"
    SERVICE = "service"
    BACKEND = "backend"
    CERTIFICATE = "certificate"


@dataclass(frozen=True)
class Finding:
    """One check's result in plain words, and what to do when it is not ok."""

    check: Check
    level: Level
    message: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form (docs/ctl.md)."""
        return {
            "Check": self.check.value,
            "Level": self.level.word,
            "Message": self.message,
            "Fix": self.fix,
        }


@dataclass(frozen=True)
class Resolution:
    """A DNS answer: the addresses, or why there are none."""

    name: str
    addresses: tuple[str, ...]
    error: str | None
    #: ``HOST:PORT`` of the DNS server asked; None for the system resolver.
    server: str | None


@dataclass(frozen=True)
class Connect:
    """Whether a TCP connection was accepted, and why not."""

    accepted: bool
    error: str | None


class Probe(enum.Enum):
    """What the connection through the tunnel sends."""

    #: Wait briefly for the service to speak first, then a HEAD request.
    HTTP = "HTTP HEAD request"
    #: A TLS ClientHello naming the tunnel's host name.
    TLS = "TLS ClientHello"


class Ending(enum.Enum):
    """How the connection through the tunnel ended."""

    #: Bytes came back.
    ANSWERED = "answered"
    #: Closed (FIN) before any byte came back.
    CLOSED = "closed"
    #: Reset (RST) before any byte came back: the gateway passes on a
    #: stream the client reset because its service refused the connection.
    RESET = "reset"
    #: Nothing came back within the timeout, and still open.
    SILENT = "silent"


@dataclass(frozen=True)
class Answer:
    """What a connection through the tunnel showed."""

    probe: Probe
    ending: Ending
    #: The first bytes that came back (at most KEEP_BYTES).
    data: bytes
    seconds: float
    #: Why the connection itself failed, if it did.
    error: str | None
