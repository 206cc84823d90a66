"""A reader that stops reading GET /events, on real loopback sockets.

Its socket fills (kernel buffers, then Twisted's), the gateway pauses its
stream, keeps at most MaxEventBacklog events for it, then cuts it with a
``stream.cut`` notice: the gateway's memory stays bounded whatever the
reader does, and the other readers are not held back.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory as PlainFactory
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from tests.support import Deployment, wait_until
from threshold.server.api import ManagementAPI
from threshold.server.events import EventFeed, EventType
from threshold.server.events_service import EventService
from threshold.server.events_sse import EventStreams, StreamSettings, SubscriberState
from threshold.server.registry import ClientRegistry
from threshold.server.routes import RouteTable
from threshold.server.site import ManagementLimits, management_site

BACKLOG = 10


class RawReader(Protocol):
    """Sends GET /events, then reads only when told to."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(
            b"GET /events HTTP/1.1\r\nHost: gateway\r\n"
            b"Accept: text/event-stream\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.closed = True


class SlowReaderTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_reader_that_stops_reading_is_cut_and_others_go_on(self):
        deployment = Deployment(False, self.mktemp(), max_event_backlog=BACKLOG)
        deployment.start_server()
        self.addCleanup(deployment.stop)
        [service] = [
            s for s in deployment.server_service if isinstance(s, EventService)
        ]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", deployment.management_port)
        slow = yield connectProtocol(endpoint, RawReader())
        fast = yield connectProtocol(endpoint, RawReader())
        self.addCleanup(lambda: slow.transport.loseConnection())
        self.addCleanup(lambda: fast.transport.loseConnection())
        yield wait_until(lambda: len(service.streams.subscribers) == 2, 10, "streams")
        slow.transport.pauseProducing()  # stops reading its socket
        slow_stream = service.streams.subscribers[0]
        # Large events, a few at a time (a burst larger than the backlog
        # would cut any reader), with reactor turns between, until the slow
        # one is cut.
        most_waiting = 0
        sent = 0
        payload = "x" * 16384
        while service.streams.cuts == 0 and sent < 20000:
            for _ in range(3):
                service.feed.emit(EventType.CLIENT_HEALTH, Detail=payload)
                most_waiting = max(most_waiting, len(slow_stream.backlog))
                sent += 1
            yield deferLater(reactor, 0.001, lambda: None)
        self.assertEqual(service.streams.cuts, 1)
        self.assertLessEqual(most_waiting, BACKLOG)
        self.assertEqual(len(slow_stream.backlog), 0)
        self.assertIsNot(service.streams.subscribers[0].state, SubscriberState.ENDED)
        # The fast reader got every event, in order.
        yield wait_until(
            lambda: fast.received.count(b"event: client.health") == sent, 20, "all"
        )
        # The slow reader, reading again, finds the stream ended with stream.cut.
        slow.transport.resumeProducing()
        yield wait_until(lambda: b"event: stream.cut" in slow.received, 20, "the cut")
        self.assertTrue(slow.received.endswith(b"0\r\n\r\n"))  # chunked: ended


class IdleTimeoutTests(TestCase):
    """The management API's idle timeout does not cut an open stream."""

    timeout = 30

    @inlineCallbacks
    def test_a_quiet_stream_outlives_the_idle_timeout(self):
        feed = EventFeed(reactor)
        # Keep-alive far away: only the idle timeout could close the stream.
        streams = EventStreams(feed, Clock(), StreamSettings(keepalive=3600))
        streams.start()
        self.addCleanup(streams.close)
        routes = RouteTable(lambda *a: None, lambda key: PlainFactory())
        api = ManagementAPI(routes, ClientRegistry(), events=streams)
        site = management_site(api, ManagementLimits(idle_timeout=0.3), reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        reader = yield connectProtocol(endpoint, RawReader())
        self.addCleanup(lambda: reader.transport.loseConnection())
        yield wait_until(lambda: streams.subscribers, 10, "the stream")
        yield deferLater(reactor, 1.5, lambda: None)  # five idle timeouts
        self.assertFalse(reader.closed)
        feed.emit(EventType.CLIENT_CONNECTED, ClientId="a")
        yield wait_until(
            lambda: b"event: client.connected" in reader.received, 10, "the event"
        )
