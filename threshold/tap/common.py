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
    IProtocol,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer

from threshold.config import ClientConfig, ConfigError, ServerConfig
from threshold.logs import observer as log_observer
from threshold.mux.session import SessionConfig

C = TypeVar("C")

log = Logger(observer=log_observer)


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


@implementer(IProtocolNegotiationFactory)
class LazyFactory(Factory):
    """A listener's factory built by ``make()`` once the reactor runs.

    For what is slow to import and not needed to accept the first
    connections (the management API: klein and twisted.web are about
    0.15 s of the gateway's start-up): the socket is bound at start as
    before, the real factory is made right after the reactor starts (or at
    the first connection, if that comes first), and it gets the
    ``doStart``/``doStop`` calls the socket made meanwhile. If ``make()``
    fails, the process stops, as a failed start-up would. The real
    factory's ALPN protocols are offered (TLS asks the factory it wraps).
    """

    noisy = False

    def __init__(self, make: Callable[[], IProtocolFactory], reactor: Any) -> None:
        self._make = make
        self._reactor = reactor
        self._real: IProtocolFactory | None = None
        self._starts = 0
        reactor.callWhenRunning(self._load_or_stop)

    @property
    def made(self) -> IProtocolFactory | None:
        """The real factory once made, else None."""
        return self._real

    def load(self) -> IProtocolFactory:
        """The real factory, made now if it was not yet."""
        if self._real is None:
            real = self._make()
            for _ in range(self._starts):
                real.doStart()
            self._real = real
        return self._real

    def _load_or_stop(self) -> None:
        try:
            self.load()
        except Exception:
            log.failure("threshold: cannot set up a listener's service; stopping")
            self._reactor.stop()

    def doStart(self) -> None:  # noqa: N802
        """A socket listens with this factory (passed on once made)."""
        self._starts += 1
        if self._real is not None:
            self._real.doStart()

    def doStop(self) -> None:  # noqa: N802
        """A socket stopped listening with this factory."""
        self._starts -= 1
        if self._real is not None:
            self._real.doStop()

    def buildProtocol(self, addr: Any) -> IProtocol | None:  # noqa: N802
        """The real factory's protocol (made first if needed)."""
        return self.load().buildProtocol(addr)

    def acceptableProtocols(self) -> list[bytes]:  # noqa: N802
        """The real factory's ALPN protocols, if it has any (else none)."""
        negotiating = IProtocolNegotiationFactory(self.load(), None)
        return list(negotiating.acceptableProtocols()) if negotiating else []
