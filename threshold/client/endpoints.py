"""Endpoints for the client's local services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint


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
            return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
        return HostnameEndpoint(reactor, host, port, timeout=timeout)

    return make
