"""``threshold-ctl events``: follow the gateway's event stream (``GET /events``).

One line per event (or one JSON object per line with ``--json``), as they
happen. A dropped stream is resumed with ``Last-Event-ID`` after a short
wait (doubling up to :data:`MAX_RETRY_WAIT`), so nothing is missed while
the gateway keeps it in its history; a ``stream.reset`` says when some
was missed anyway. ``--since ID`` starts after an id, ``--type client.*``
keeps some types (the gateway filters), ``--count N`` stops after N
events. The first connection failing ends the command (exit 3, or 1 for
an error answer); once the stream was up, it reconnects until stopped.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import TimeoutMixin
from twisted.web.http_headers import Headers

from threshold.ctl.errors import (
    EXIT_OK,
    PROG,
    AnswerError,
    UnreachableError,
    UsageError,
    one_line,
)
from threshold.ctl.exchange import Target, describe, error_message

__all__ = [
    "EventLine",
    "SseParser",
    "add_parser",
    "check_options",
    "format_event",
    "run_events",
]

#: Longest wait between two reconnections (seconds).
MAX_RETRY_WAIT = 30.0
#: Longest SSE line accepted (a gateway's events are far smaller).
MAX_LINE = 1024 * 1024
#: Longest error answer read.
MAX_ERROR_BODY = 64 * 1024

_PATTERN = re.compile(r"[a-z*][a-z0-9_.*]{0,63}")


def _id(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", value):
        raise argparse.ArgumentTypeError(f"not an event id (a whole number): {value!r}")
    return int(value)


def _count(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", value) or int(value) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number: {value!r}")
    return int(value)


def _idle(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 1 to 3600, not {value}")
    return seconds


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``events`` to the subcommands."""
    parser = commands.add_parser(
        "events",
        help="follow the event stream (GET /events): one line per event",
        description="Print the gateway's events as they happen (docs/events.md);"
        " reconnects with Last-Event-ID when the stream drops. Ctrl-C stops.",
    )
    parser.add_argument(
        "--since",
        metavar="ID",
        type=_id,
        default=None,
        help="start after this event id (0: every event the gateway still keeps)",
    )
    parser.add_argument(
        "--type",
        metavar="PATTERN",
        action="append",
        dest="types",
        default=None,
        help="only these event types, * as a wildcard (client.*); repeat or"
        " separate with commas",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line (the event as the gateway sends it)",
    )
    parser.add_argument(
        "--count",
        metavar="N",
        type=_count,
        default=None,
        help="stop after N events",
    )
    parser.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        type=_idle,
        default=60.0,
        help="reconnect when nothing (not even a keep-alive) came this long"
        " (default 60)",
    )
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Check ``--type`` patterns before anything is sent."""
    patterns = []
    for value in args.types or ():
        for pattern in value.split(","):
            pattern = pattern.strip()
            if not _PATTERN.fullmatch(pattern):
                raise UsageError(
                    f"--type {pattern!r}: an event type or pattern is a-z 0-9 _ ."
                    " and * (client.*)"
                )
            patterns.append(pattern)
    args.types = patterns or None


@dataclass
class EventLine:
    """One SSE message: its fields."""

    id: str | None = None
    event: str = "message"
    data: list[str] = field(default_factory=list)


class SseParser:
    """The text/event-stream format, fed in pieces; bounded lines."""

    def __init__(self) -> None:
        self._buffer = b""
        self._current = EventLine()

    def feed(self, data: bytes) -> list[EventLine]:
        """The messages completed by ``data`` (a blank line ends each)."""
        self._buffer += data
        done: list[EventLine] = []
        while True:
            match = re.search(rb"\r\n|\r|\n", self._buffer)
            if match is None:
                if len(self._buffer) > MAX_LINE:
                    raise ValueError(f"an event line longer than {MAX_LINE} bytes")
                return done
            if match.group() == b"\r" and match.end() == len(self._buffer):
                return done  # maybe the start of \r\n
            line = self._buffer[: match.start()].decode("utf-8", "replace")
            self._buffer = self._buffer[match.end() :]
            self._line(line, done)

    def _line(self, line: str, done: list[EventLine]) -> None:
        if not line:
            if self._current.data or self._current.id is not None:
                done.append(self._current)
            self._current = EventLine()
            return
        if line.startswith(":"):
            return  # a comment: the keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._current.id = value
        elif name == "event":
            self._current.event = value
        elif name == "data":
            self._current.data.append(value)


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def format_event(event: dict[str, Any]) -> str:
    """``<time> <id> <type> Key=value ...``: one line, for people."""
    data = event.get("data")
    fields = (
        " ".join(f"{k}={_value(v)}" for k, v in data.items())
        if isinstance(data, dict)
        else ""
    )
    ident = event.get("id") or "-"
    line = f"{event.get('time', '?')}  {ident:>6}  {event.get('type', '?')}  {fields}"
    return one_line(line.rstrip())


class _StreamReader(Protocol, TimeoutMixin):
    """Reads one response body: SSE messages to ``on_message``, idle timeout."""

    def __init__(
        self,
        reactor: Any,
        idle: float,
        on_message: Callable[[EventLine], bool],
    ) -> None:
        self.callLater = reactor.callLater  # type: ignore[method-assign]
        self.idle = idle
        self.on_message = on_message
        self.parser = SseParser()
        self.finished: Deferred[str] = Deferred()
        self.why = "the stream ended"

    def connectionMade(self) -> None:  # noqa: N802
        self.setTimeout(self.idle)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.resetTimeout()
        try:
            messages = self.parser.feed(data)
        except ValueError as e:
            self._stop(str(e))
            return
        for message in messages:
            if not self.on_message(message):
                self._stop("done")
                return

    def timeoutConnection(self) -> None:  # noqa: N802
        self._stop(f"nothing received for {self.idle:g} seconds")

    def _stop(self, why: str) -> None:
        self.why = why
        self.setTimeout(None)
        self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.setTimeout(None)
        if not self.finished.called:
            self.finished.callback(self.why)


class Follower:
    """Follows the stream, reconnecting, until ``count`` events or forever."""

    def __init__(
        self,
        reactor: Any,
        target: Target,
        args: argparse.Namespace,
        stdout: IO[str],
        stderr: IO[str],
    ) -> None:
        self.reactor = reactor
        self.target = target
        self.stdout = stdout
        self.stderr = stderr
        self.json = args.json or getattr(args, "output", None) == "json"
        self.count = args.count
        self.idle = args.idle_timeout
        self.types = args.types
        self.last_id: int | None = args.since
        self.printed = 0
        self.done = False

    def _path(self) -> str:
        if not self.types:
            return "/events"
        return "/events?type=" + quote(",".join(self.types), safe="*,")

    async def run(self) -> int:
        """Follow until done; the first failure to connect is an error."""
        connected_once = False
        wait = 1.0
        while True:
            try:
                why = await self._once()
                connected_once = True
                wait = 1.0
            except (AnswerError, UnreachableError) as e:
                retryable = isinstance(e, UnreachableError) or e.status >= 500
                if not connected_once or not retryable:
                    raise
                why = str(e)
            if self.done:
                return EXIT_OK
            self.stderr.write(
                f"{PROG}: event stream: {one_line(why)}; reconnecting in {wait:g}s\n"
            )
            self.stderr.flush()
            await deferLater(self.reactor, wait, lambda: None)
            wait = min(MAX_RETRY_WAIT, wait * 2)

    async def _once(self) -> str:
        """One stream: connect, read until it ends; why it ended."""
        headers = {
            b"Accept": [b"text/event-stream"],
            b"Cache-Control": [b"no-cache"],
            b"User-Agent": [PROG.encode()],
        }
        if self.last_id is not None:
            headers[b"Last-Event-ID"] = [str(self.last_id).encode()]
        url = (self.target.base_url + self._path()).encode("ascii")
        d = self.target.agent.request(b"GET", url, Headers(headers))
        d.addTimeout(self.target.timeout, self.reactor)
        try:
            response = await d
        except Exception as e:
            raise UnreachableError(
                f"cannot reach {self.target.base_url}: {describe(e, self.target)}"
            ) from None
        if response.code != 200:
            body = await _small_body(response, self.reactor, self.target.timeout)
            phrase = (response.phrase or b"").decode("latin-1")
            raise AnswerError(response.code, phrase, error_message(body))
        reader = _StreamReader(self.reactor, self.idle, self._message)
        response.deliverBody(reader)
        return await reader.finished

    def _message(self, message: EventLine) -> bool:
        """Print one message; False once ``count`` events are printed."""
        try:
            event = json.loads("\n".join(message.data))
        except ValueError:
            event = {"type": message.event, "data": "\n".join(message.data)}
        if message.id is not None and message.id.isdigit():
            self.last_id = int(message.id)
        is_event = message.id is not None
        if not is_event:
            self._notice(event)
        if self.types and is_event:
            if not any(fnmatch.fnmatchcase(message.event, p) for p in self.types):
                return True
        if self.json:
            self.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        else:
            self.stdout.write(format_event(event) + "\n")
        self.stdout.flush()
        if is_event:
            self.printed += 1
            if self.count is not None and self.printed >= self.count:
                self.done = True
                return False
        return True

    def _notice(self, event: dict[str, Any]) -> None:
        """Stream notices also go to stderr, in words."""
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        reason = data.get("Reason") if isinstance(data, dict) else None
        if event.get("type") == "stream.reset":
            self.stderr.write(
                f"{PROG}: warning: some events were missed: {reason}"
                f" (oldest kept: {data.get('OldestId')})\n"
            )
        elif reason:
            self.stderr.write(f"{PROG}: event stream: {reason}\n")


async def _small_body(response: Any, reactor: Any, timeout: float) -> bytes:
    """An error answer's body, at most MAX_ERROR_BODY bytes."""
    from treq import collect

    chunks: list[bytes] = []
    size = 0

    def keep(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size <= MAX_ERROR_BODY:
            chunks.append(data)

    d = collect(response, keep)
    d.addTimeout(timeout, reactor)
    try:
        await d
    except Exception:
        pass  # what came is enough to say why
    return b"".join(chunks)


async def run_events(
    reactor: Any,
    args: argparse.Namespace,
    target: Target,
    stdout: IO[str],
    stderr: IO[str],
) -> int:
    """``threshold-ctl events``: follow the stream; the exit status."""
    return await Follower(reactor, target, args, stdout, stderr).run()
