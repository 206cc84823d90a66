"""The session's tunables, with their defaults and bounds."""

from __future__ import annotations

from dataclasses import dataclass

from threshold.wire.frames import MAX_UINT32

#: Every stream's window in each direction when it opens (the yamux spec).
INITIAL_WINDOW = 256 * 1024


@dataclass(frozen=True)
class SessionConfig:
    """Tunables of a session; the defaults are safe on the public internet."""

    #: Receive window a stream may grow to (auto-tuned from 256 KiB).
    max_window: int = 16 * 1024 * 1024
    #: Streams open at once; a peer opening more gets RST on the excess.
    max_streams: int = 4096
    #: Largest Data frame accepted (a larger header is a protocol error).
    max_frame_receive: int = 16 * 1024 * 1024
    #: Largest Data frame sent.
    max_frame_send: int = 64 * 1024
    #: Seconds between keepalive Pings; 0 disables keepalive.
    keepalive_interval: float = 30.0
    #: Seconds a Ping may go unanswered before the session is dead.
    keepalive_timeout: float = 90.0
    #: Seconds a closed stream waits for the peer's FIN before RST.
    stream_linger: float = 30.0
    #: Seconds to let the transport flush after Go Away before aborting it.
    close_timeout: float = 5.0
    #: Log every frame sent and received at debug level (``DebugLog``).
    debug_frames: bool = False
    #: Control-frame bytes written while the peer is not reading before the
    #: session is closed (Window Updates, RSTs: bounded, but not by windows).
    max_control_backlog: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_window < INITIAL_WINDOW or self.max_window > MAX_UINT32:
            raise ValueError(
                f"max_window must be from {INITIAL_WINDOW} to {MAX_UINT32}"
            )
        if self.max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if self.max_frame_send < 1:
            raise ValueError("max_frame_send must be at least 1")
