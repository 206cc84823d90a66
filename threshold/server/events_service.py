"""The event feed as a twistd service: feed, sources, streams, webhooks.

:func:`build_events` makes one from the server config; the service tree
starts it after the gateway and stops it first, so that every stream
ends with ``stream.closed`` and no webhook is posted once the gateway
goes down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed

from threshold.server.events import EventFeed
from threshold.server.events_sources import EventSources
from threshold.server.events_sse import EventStreams, StreamSettings
from threshold.server.webhooks import Poster, Webhook, build_webhooks, treq_poster

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from threshold.config import ServerConfig
    from threshold.server.certinfo import CertificateInfo

__all__ = ["EventService", "build_events"]


class EventService(Service):
    """Owns the feed and everything that reads or writes it."""

    def __init__(
        self,
        feed: EventFeed,
        sources: EventSources,
        streams: EventStreams,
        webhooks: list[Webhook],
        close: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        self.feed = feed
        self.sources = sources
        self.streams = streams
        self.webhooks = webhooks
        self._close = close

    def startService(self) -> None:  # noqa: N802
        """Open the streams and start the certificate checks."""
        Service.startService(self)
        self.streams.start()
        self.sources.start()

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """End every stream (``stream.closed``), stop the webhooks."""
        Service.stopService(self)
        self.sources.stop()
        self.feed.close()
        self.streams.close()
        return self._close() if self._close is not None else succeed(None)


def build_events(
    config: ServerConfig,
    server: Any,
    clock: IReactorTime,
    server_certificate: CertificateInfo | None = None,
    post: Poster | None = None,
) -> EventService:
    """The event service of a gateway (``server``: its TunnelServer).

    Raises ConfigError when a webhook's ``SecretFile`` cannot be read.
    """
    feed = EventFeed(
        clock,
        history=config.event_history_size,
        limit_interval=config.limit_event_interval_seconds,
        id_base=int(time.time() * 1000),
    )
    sources = EventSources(
        feed,
        server.registry,
        server.serving,
        server.routes,
        server.stats,
        server_certificate,
    )
    streams = EventStreams(
        feed,
        clock,
        StreamSettings(
            max_subscribers=config.max_event_subscribers,
            max_backlog=config.max_event_backlog,
            keepalive=config.event_keepalive_seconds,
        ),
    )
    close: Callable[[], Deferred[None]] | None = None
    if config.webhooks and post is None:
        post, close = treq_poster(clock)
    hooks = (
        build_webhooks(config.webhooks, feed, clock, post, config.source)
        if post is not None
        else []
    )
    return EventService(feed, sources, streams, hooks, close)
