"""The session's tunables, with their defaults and bounds (one table).

The config files set some of them under the JSON names given here
(``threshold.config`` takes the fields from ``SESSION``); the rest are
fixed. Both the defaults and the bounds live only here.
"""

from __future__ import annotations

from dataclasses import dataclass

from threshold.schema import BOOLEAN, Bytes, Integer, Schema, Seconds, field
from threshold.wire.frames import MAX_UINT32

#: Every stream's window in each direction when it opens (the yamux spec).
INITIAL_WINDOW = 256 * 1024

_MIB = 1024 * 1024


@dataclass(frozen=True)
class SessionConfig:
    """Tunables of a session; the defaults are safe on the public internet."""

    max_window: int = field(
        "MaxReceiveWindowBytes",
        Bytes(INITIAL_WINDOW, MAX_UINT32),  # a Window Update's delta is 32 bits
        16 * _MIB,
        doc="Largest receive window one stream may grow to, auto-tuned from"
        " 256 KiB (throughput on long links against memory).",
    )
    max_streams: int = field(
        "MaxStreamsPerSession",
        Integer(1),
        4096,
        doc="Streams (tunneled connections) open at once on one session; a peer"
        " opening more gets RST on the excess.",
    )
    max_frame_receive: int = field(
        None,
        Bytes(1, MAX_UINT32),
        16 * _MIB,
        doc="Largest Data frame accepted (a larger header is a protocol error).",
    )
    max_frame_send: int = field(
        None, Bytes(1, MAX_UINT32), 64 * 1024, doc="Largest Data frame sent."
    )
    keepalive_interval: float = field(
        "KeepaliveIntervalSeconds",
        Seconds(zero_ok=True),
        30.0,
        doc="Interval between keepalive Pings on a session.",
    )
    keepalive_timeout: float = field(
        "KeepaliveTimeoutSeconds",
        Seconds(),
        90.0,
        doc="A session whose Ping has gone unanswered this long is dead and is closed.",
    )
    stream_linger: float = field(
        None,
        Seconds(zero_ok=True),
        30.0,
        doc="How long a closed stream waits for the peer's FIN before RST.",
    )
    close_timeout: float = field(
        None,
        Seconds(zero_ok=True),
        5.0,
        doc="How long the transport may flush after Go Away before it is aborted.",
    )
    debug_frames: bool = field(
        None,
        BOOLEAN,
        False,
        doc="Log every frame sent and received at debug level (set by `DebugLog`).",
    )
    max_control_backlog: int = field(
        None,
        Bytes(1),
        _MIB,
        doc="Control-frame bytes (Window Updates, RSTs) written while the peer"
        " is not reading before the session is closed: bounded, but not by"
        " windows.",
    )
    window_budget: int = field(
        None,
        Bytes(0),
        64 * _MIB,
        doc="Receive window all streams of one session may grow by together,"
        " beyond each one's initial 256 KiB (what readers that stop can pin).",
    )

    def __post_init__(self) -> None:
        SESSION.validate(self)


#: The table of :class:`SessionConfig` (checked on construction).
SESSION = Schema(SessionConfig, checked_by_init=True)
