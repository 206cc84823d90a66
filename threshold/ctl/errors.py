"""threshold-ctl's exit statuses and the errors that end a command with one."""

from __future__ import annotations

import re

PROG = "threshold-ctl"

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_BUG = 70  # EX_SOFTWARE in sysexits.h


class CtlError(Exception):
    """A failure that ends the command with ``exit_status`` and one line."""

    exit_status = EXIT_API_ERROR

    def line(self) -> str:
        """The line printed on stderr."""
        return f"{PROG}: {self}"


class UsageError(CtlError):
    """Bad arguments or input, found before any request was sent."""

    exit_status = EXIT_USAGE

    def line(self) -> str:
        return f"{PROG}: error: {self}"


class AnswerError(CtlError):
    """The API answered with an error status, or not as the API does."""

    exit_status = EXIT_API_ERROR

    def __init__(self, status: int, phrase: str, message: str) -> None:
        head = f"{status} {phrase}".strip()
        super().__init__(f"{head}: {message}" if message else head)
        self.status = status
        self.phrase = phrase
        self.message = message


class UnreachableError(CtlError):
    """No answer from the server: refused, TLS failure, timeout."""

    exit_status = EXIT_UNREACHABLE


def one_line(text: str) -> str:
    """Escape control characters so a message stays on one line."""
    return re.sub(
        r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text
    ).strip()
