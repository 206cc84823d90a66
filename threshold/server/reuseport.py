"""Public sockets bound with ``SO_REUSEPORT`` (``"ReusePort": true``).

Twisted's ``listenTCP`` has no option for it, so the socket is made here
(``SO_REUSEADDR`` and ``SO_REUSEPORT``, bound, listening) and handed to
``reactor.adoptStreamPort``. Gateways on one machine then share each public
port and the kernel spreads new connections over them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory

__all__ = ["BACKLOG", "reuseport_listen"]

#: listenTCP's default backlog.
BACKLOG = 50

Listen = Callable[[str, int, IProtocolFactory], Deferred[IListeningPort]]


def reuseport_listen(reactor: Any) -> Listen:
    """A ``listen(host, port, factory)`` binding with ``SO_REUSEPORT``."""

    def listen(host: str, port: int, factory: IProtocolFactory) -> Deferred[Any]:
        # "::" stays dual-stack as with TCP6ServerEndpoint (IPV6_V6ONLY is
        # left at the system default).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
            # adoptStreamPort duplicates the descriptor: ours is closed below.
            port_object = reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            return fail(CannotListenError(host, port, e))
        finally:
            sock.close()
        return succeed(port_object)

    return listen
