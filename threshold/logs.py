"""One log level for all of threshold's loggers.

A module logs through ``Logger(observer=observer)``, a filter in front of
Twisted's global publisher, so that ``DebugLog`` turns the frame- and
connection-level detail on and off without touching other log sources. A
``Logger()`` made without it writes to the global publisher directly: its
debug events are never filtered out, so a module that logs at debug level
must use ``observer``.
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

#: The observer every threshold Logger writes to.
observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def set_debug(enabled: bool) -> None:
    """Log debug events too (``DebugLog``), or only info and above."""
    _predicate.setLogLevelForNamespace(
        "threshold", LogLevel.debug if enabled else LogLevel.info
    )


def json_lines() -> ILogObserver:
    """A log observer writing one JSON object per line to standard output.

    For twistd: ``twistd --logger=threshold.logs.json_lines -n threshold-server
    ...``. Each line carries the event's fields (``log_namespace``,
    ``log_level``, ``log_time``, the message format and its values, such as
    ``client_id`` or ``bytes_in``), ready for a log pipeline.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
