"""What both roles' service makers share.

The command line (``-c FILE``), start-up failure, listeners, session
settings. A configuration error stops start-up with one line naming the
file and the field, and exit status 1: everything is loaded and checked
before any socket is opened.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer

from threshold.config import ClientConfig, ConfigError, ServerConfig
from threshold.mux.session import SessionConfig

C = TypeVar("C")


def fail(message: str) -> SystemExit:
    """One line on stderr, exit status 1, no traceback."""
    print(f"threshold: {message}", file=sys.stderr)
    return SystemExit(1)


class ConfigFileOptions(usage.Options):
    """The command line of either role: ``-c/--config FILE``."""

    optParameters = [
        ["config", "c", "config.json", "The JSON configuration file."],
    ]


def service_from_file(
    options: usage.Options,
    reactor: Any,
    load: Callable[[str], C],
    build: Callable[[C, Any], MultiService],
    errors: tuple[type[Exception], ...] = (ConfigError,),
) -> MultiService:
    """Load ``--config`` with ``load`` and ``build`` the service tree from it.

    Any of ``errors`` stops start-up with one line (see :func:`fail`).
    """
    if reactor is None:
        from twisted.internet import reactor
    try:
        return build(load(options["config"]), reactor)
    except errors as e:
        raise fail(str(e)) from None


def server_endpoint(
    reactor: Any, host: str, port: int, tls: Any | None
) -> IStreamServerEndpoint:
    """Listen on ``host:port``: IPv6 for an IPv6 address (``"::"``); TLS if ``tls``."""
    if isIPv6Address(host):
        endpoint: IStreamServerEndpoint = TCP6ServerEndpoint(
            reactor, port, interface=host
        )
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, interface=host)
    return endpoint if tls is None else TlsServerEndpoint(endpoint, tls)


@implementer(IStreamServerEndpoint)
class TlsServerEndpoint:
    """TLS on any stream server endpoint (as ``listenSSL`` does on TCP)."""

    def __init__(self, endpoint: IStreamServerEndpoint, tls: Any) -> None:
        self.endpoint = endpoint
        self.tls = tls

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen, each connection inside TLS with ``tls``'s options."""
        return self.endpoint.listen(TLSMemoryBIOFactory(self.tls, False, factory))


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
