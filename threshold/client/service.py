"""The tunnel client's services: hold one session to each gateway, reconnecting.

One ``ClientService`` per gateway, each with its own
:class:`~threshold.client.gateway.GatewayLink` and its own backoff, so a
gateway that is down or draining never holds up the sessions to the others.

Reconnecting is Twisted's ``ClientService`` with exponential backoff and
jitter. A refused (or unanswered) hello ends a connection that did succeed,
which ``ClientService`` counts as no failure, so the backoff also grows with
the hellos refused in a row: a misconfigured client backs off instead of
hammering the server.

(``ClientService``'s own ``prepareConnection`` would count a refusal, but
a connection it rejected later raises ``NoTransition`` inside Twisted when
it closes, so the client counts refusals itself.)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.application.internet import ClientService, backoffPolicy
from twisted.logger import Logger

from threshold.client.gateway import LinkEndpoint
from threshold.client.session import session_factory
from threshold.logs import observer as log_observer

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

    from threshold.client.gateway import GatewayLink
    from threshold.client.settings import ClientSettings

log = Logger(observer=log_observer)


class _TunnelClientService(ClientService):
    """ClientService that ends the session with Go Away when stopped."""

    def __init__(self, link: GatewayLink, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.link = link

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """Say Go Away and close; then let ClientService finish stopping."""
        d = self.whenConnected(failAfterFailures=1)
        d.addCallbacks(lambda session: session.close(), lambda _: None)
        stopped = super().stopService()
        stopped.addCallback(self._stopped)
        return stopped

    def _stopped(self, result: object) -> object:
        self.link.stopped()
        return result


def reconnecting_service(
    settings: ClientSettings,
    link: GatewayLink,
    endpoint: IStreamClientEndpoint,
    clock: IReactorTime,
    initial_delay: float = 1.0,
    max_delay: float = 60.0,
    jitter: Callable[[], float] = random.random,
) -> ClientService:
    """A ``ClientService`` holding the session to one gateway, with backoff.

    The wait grows with failures and refused hellos in a row, with jitter.

    ``whenConnected()`` gives the connection's
    :class:`~threshold.mux.session.MuxSession`; its ``handler`` is the
    :class:`~threshold.client.session.ClientSession`, whose ``when_ready()``
    says whether the hello was accepted.
    """
    policy = backoffPolicy(
        initialDelay=initial_delay,
        maxDelay=max_delay,
        factor=2.0,
        jitter=jitter,
    )

    def logged(attempt: int) -> float:
        delay = policy(max(attempt, link.consecutive_refusals))
        log.info(
            "reconnecting to {server} in {delay:.1f}s (attempt {attempt})",
            server=link.label,
            delay=delay,
            attempt=attempt + 1,
        )
        return delay

    return _TunnelClientService(
        link,
        LinkEndpoint(endpoint, link),
        session_factory(settings, link),
        retryPolicy=logged,
        clock=clock,
    )
