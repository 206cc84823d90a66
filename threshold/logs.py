"""One log level for all of threshold's loggers.

A module logs through ``Logger(observer=observer)``, a filter in front of
Twisted's global publisher, so that ``DebugLog`` turns the frame- and
connection-level detail on and off without touching other log sources. A
``Logger()`` made without it writes to the global publisher directly: its
debug events are never filtered out, so a module that logs at debug level
must use ``observer``.

Two helpers keep logging off the per-connection path's costs:
:func:`debugging` lets a caller skip building a debug event (and its
fields) that would be filtered out, and :func:`emit_line` sends an event
whose text is already formatted, so the text observer does not run the
format machinery over its fields again.
"""

from __future__ import annotations

import sys
import time

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

#: The observer every threshold Logger writes to.
observer = FilteringLogObserver(globalLogPublisher, [_predicate])

_debug = False


def set_debug(enabled: bool) -> None:
    """Log debug events too (``DebugLog``), or only info and above."""
    global _debug
    _debug = enabled
    _predicate.setLogLevelForNamespace(
        "threshold", LogLevel.debug if enabled else LogLevel.info
    )


def debugging() -> bool:
    """Whether threshold's debug events are logged (``DebugLog``).

    A debug call builds its event and fields before the filter drops it:
    on a per-connection path, check this first.
    """
    return _debug


def emit_line(logger: Logger, level: LogLevel, text: str, **fields: object) -> None:
    """Emit an event whose message ``text`` is already formatted.

    ``fields`` travel with the event for structured observers
    (:func:`json_lines`) but are not formatted again: Twisted's text
    observer formats just ``{text}``. For lines written once per
    connection, where ``Logger.info`` with a dozen fields costs about
    twice as much (docs/performance.md).
    """
    event = fields
    event["log_logger"] = logger
    event["log_level"] = level
    event["log_namespace"] = logger.namespace
    event["log_source"] = logger.source
    event["log_format"] = "{text}"
    event["log_time"] = time.time()
    event["text"] = text
    logger.observer(event)


def json_lines() -> ILogObserver:
    """A log observer writing one JSON object per line to standard output.

    For twistd: ``twistd --logger=threshold.logs.json_lines -n threshold-server
    ...``. Each line carries the event's fields (``log_namespace``,
    ``log_level``, ``log_time``, the message format and its values, such as
    ``client_id`` or ``bytes_in``), ready for a log pipeline.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
