"""Endpoints for the client's local services, and connecting a relay to one.

A service stream connects to its local service once per tunneled
connection, so that connect is on the per-connection path:
:func:`connect_relay` does it with ``reactor.connectTCP`` and a plain
factory when the endpoint is one of :func:`local_tcp_endpoint`'s address
endpoints, without an endpoint's Deferred chain and the wrapping protocol
that would stand between every chunk and the relay (about a fifth of the
client's busy time at high connection rates, docs/performance.md). Any
other endpoint (a name, a test's fake) is connected through its
``connect``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IConnector, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from threshold.relay import RelayEnd

#: Called with the local end once its connection is made.
Connected = Callable[[RelayEnd], None]
#: Called with why the connection could not be made (or was cancelled).
Failed = Callable[[Failure], None]
#: Stops a connection attempt still in progress; does nothing after it.
Cancel = Callable[[], None]


class _DirectConnect:
    """An address endpoint that also connects a relay without a Deferred."""

    _reactor: Any
    _host: str
    _port: int
    _timeout: float
    _bindAddress: Any

    def connect_relay(self, connected: Connected, failed: Failed) -> Cancel:
        """Connect a new :class:`RelayEnd`; exactly one callback follows."""
        factory = _RelayFactory(connected, failed)
        connector = self._reactor.connectTCP(
            self._host,
            self._port,
            factory,
            timeout=self._timeout,
            bindAddress=self._bindAddress,
        )
        return lambda: _stop_connecting(connector)


class DirectTCP4Endpoint(_DirectConnect, TCP4ClientEndpoint):
    """``TCP4ClientEndpoint`` with :meth:`connect_relay`."""


class DirectTCP6Endpoint(_DirectConnect, TCP6ClientEndpoint):
    """``TCP6ClientEndpoint`` with :meth:`connect_relay`."""


def _stop_connecting(connector: IConnector) -> None:
    # Only a connector still connecting can stop; its factory then hears
    # clientConnectionFailed (UserError), as a cancelled endpoint fails.
    if getattr(connector, "state", None) == "connecting":
        connector.stopConnecting()


class _LocalEnd(RelayEnd):
    """The local service's end of a relay: says when it is connected."""

    def __init__(self, connected: Connected) -> None:
        super().__init__()
        self._on_connected: Connected | None = connected

    def connectionMade(self) -> None:  # noqa: N802
        """Tell the stream (once), which splices us in."""
        connected, self._on_connected = self._on_connected, None
        if connected is not None:
            connected(self)


class _RelayFactory(ClientFactory):
    """One connection attempt's factory: builds the one local end."""

    noisy = False  # no "Starting factory" lines per tunneled connection

    def __init__(self, connected: Connected, failed: Failed) -> None:
        self._connected = connected
        self._failed = failed

    def buildProtocol(self, addr: object) -> Protocol:  # noqa: N802
        return _LocalEnd(self._connected)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:  # noqa: N802
        self._failed(reason)


class _OneShotFactory(Factory):
    """``connectProtocol``'s factory, without its log lines.

    Twisted's ``connectProtocol`` builds a factory that keeps the default
    ``noisy = True``: two log lines ("Starting factory", "Stopping
    factory") per tunneled connection, measured at 18% of the client's busy
    time at high connection rates (docs/performance.md).
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:  # noqa: N802
        return self._protocol


def connect_relay(
    endpoint: IStreamClientEndpoint, connected: Connected, failed: Failed
) -> Cancel:
    """Connect a new :class:`RelayEnd` to ``endpoint``; returns a canceller.

    Exactly one of ``connected`` (with the end, its transport connected) or
    ``failed`` is called, ``failed`` also after a cancel.
    """
    direct = getattr(endpoint, "connect_relay", None)
    if direct is not None:
        return direct(connected, failed)  # type: ignore[no-any-return]
    d = endpoint.connect(_OneShotFactory(RelayEnd()))
    d.addCallbacks(connected, failed)
    return d.cancel


def local_tcp_endpoint(
    reactor: Any, timeout: float
) -> Callable[[str, int], IStreamClientEndpoint]:
    """Connect to local services by address, or by host name.

    An IP address connects directly; only a name goes through
    ``HostnameEndpoint`` (a resolver lookup in a thread, happy eyeballs),
    which costs more than the rest of a tunneled connection together.
    """

    def make(host: str, port: int) -> IStreamClientEndpoint:
        if isIPAddress(host):
            return DirectTCP4Endpoint(reactor, host, port, timeout=timeout)
        if isIPv6Address(host):
            return DirectTCP6Endpoint(reactor, host, port, timeout=timeout)
        return HostnameEndpoint(reactor, host, port, timeout=timeout)

    return make
