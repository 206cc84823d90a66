"""What both roles' service makers share: start-up failure, listeners, session settings.

A configuration error stops start-up with one line naming the file and the
field, and exit status 1: everything is loaded and checked before any socket
is opened.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint

from threshold.config import ClientConfig, ServerConfig
from threshold.mux.session import SessionConfig


def fail(message: str) -> SystemExit:
    """One line on stderr, exit status 1, no traceback."""
    print(f"threshold: {message}", file=sys.stderr)
    return SystemExit(1)


def server_endpoint(
    reactor: Any, host: str, port: int, tls: Any | None
) -> IStreamServerEndpoint:
    if tls is not None:
        return SSL4ServerEndpoint(reactor, port, tls, interface=host)
    return TCP4ServerEndpoint(reactor, port, interface=host)


def session_config(config: ServerConfig | ClientConfig) -> SessionConfig:
    """Session settings from the fields both roles' configs share."""
    return SessionConfig(
        max_window=config.max_receive_window_bytes,
        max_streams=config.max_streams_per_session,
        keepalive_interval=config.keepalive_interval_seconds,
        keepalive_timeout=config.keepalive_timeout_seconds,
        debug_frames=config.debug_log,
    )


def listener(
    endpoint: IStreamServerEndpoint, factory: Any
) -> StreamServerEndpointService:
    """A listening service that fails start-up at once if it cannot bind.

    twistd then stops with the error instead of running half-started.
    """
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    return service
