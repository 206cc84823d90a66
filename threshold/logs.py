"""One log level for all of threshold's loggers.

Every module logs through ``Logger(observer=observer)``, a filter in front
of Twisted's global publisher, so that ``DebugLog`` turns the frame- and
connection-level detail on and off without touching other log sources.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

#: The observer every threshold Logger writes to.
observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def set_debug(enabled: bool) -> None:
    """Log debug events too (``DebugLog``), or only info and above."""
    _predicate.setLogLevelForNamespace(
        "threshold", LogLevel.debug if enabled else LogLevel.info
    )
