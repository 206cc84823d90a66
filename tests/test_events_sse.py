"""Tests for GET /events as Server-Sent Events, over a request double and Clock.

The real HTTP path (a real SSE client, a reconnect with Last-Event-ID) is
in test_events_e2e.py; here: the format, resuming, filters, the bounds
(readers, backlog of a slow reader), keep-alive and the end at stop.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from threshold.server.events import EventFeed, EventType
from threshold.server.events_sse import (
    EventStreams,
    StreamRefused,
    StreamSettings,
    encode,
)


class FakeRequest:
    """The part of a twisted.web request a stream uses."""

    def __init__(
        self, headers: dict[bytes, bytes] | None = None, args: dict | None = None
    ) -> None:
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.args = args or {}
        self.response_headers: dict[bytes, bytes] = {}
        self.written = b""
        self.producer: Any = None

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802
        return self.headers.get(name.lower())

    def setHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802
        self.response_headers[name.lower()] = value

    def write(self, data: bytes) -> None:
        self.written += data

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def getClientAddress(self) -> str:  # noqa: N802
        return "192.0.2.1:5000"

    def messages(self) -> list[dict[str, Any]]:
        """The SSE messages written: their fields, data decoded."""
        out = []
        for block in self.written.decode().split("\n\n"):
            fields: dict[str, Any] = {}
            for line in block.split("\n"):
                if not line or line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = json.loads(value) if name == "data" else value
            if "event" in fields:
                out.append(fields)
        return out

    def events(self) -> list[str]:
        return [m["event"] for m in self.messages()]


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.feed = EventFeed(self.clock, lambda: 1_800_000_000.0, history=20)
        self.streams = EventStreams(
            self.feed,
            self.clock,
            StreamSettings(max_subscribers=3, max_backlog=5, keepalive=15),
        )
        self.streams.start()

    def emit(
        self, count: int = 1, event_type: str = EventType.CLIENT_CONNECTED
    ) -> None:
        for _ in range(count):
            self.feed.emit(event_type, ClientId="a")

    def test_format_of_an_event(self):
        """id, event and data lines, a blank line after; data is the JSON."""
        self.emit()
        [event] = self.feed.replay(0).events
        self.assertEqual(
            encode(event),
            b"id: 1\nevent: client.connected\n"
            b'data: {"id":1,"type":"client.connected",'
            b'"time":"2027-01-15T08:00:00.000Z","data":{"ClientId":"a"}}\n\n',
        )

    def test_headers_preamble_and_live_events(self):
        """text/event-stream, not cached; a retry hint; then each new event."""
        request = FakeRequest()
        d = self.streams.open(request)
        self.assertNoResult(d)
        self.assertEqual(
            request.response_headers[b"content-type"],
            b"text/event-stream; charset=utf-8",
        )
        self.assertEqual(request.response_headers[b"cache-control"], b"no-cache")
        self.assertTrue(
            request.written.startswith(b": threshold events\nretry: 1000\n\n")
        )
        self.emit(2)
        self.assertEqual([m["id"] for m in request.messages()], ["1", "2"])
        self.assertEqual(request.messages()[1]["data"]["id"], 2)

    def test_resume_with_last_event_id(self):
        """Last-Event-ID: the events after it, then live ones."""
        self.emit(4)
        request = FakeRequest({b"Last-Event-ID": b"2"})
        self.streams.open(request)
        self.emit()
        self.assertEqual([m["id"] for m in request.messages()], ["3", "4", "5"])

    def test_resume_with_since_query(self):
        """?since= for clients that cannot set headers; the header wins."""
        self.emit(4)
        request = FakeRequest(args={b"since": [b"3"]})
        self.streams.open(request)
        self.assertEqual([m["id"] for m in request.messages()], ["4"])
        both = FakeRequest({b"last-event-id": b"1"}, {b"since": [b"3"]})
        self.streams.open(both)
        self.assertEqual([m["id"] for m in both.messages()], ["2", "3", "4"])

    def test_resume_from_too_old_an_id_says_reset(self):
        """An id older than the history: stream.reset (no id) then all kept."""
        self.emit(30)
        request = FakeRequest({b"Last-Event-ID": b"3"})
        self.streams.open(request)
        messages = request.messages()
        self.assertEqual(messages[0]["event"], "stream.reset")
        self.assertNotIn("id", messages[0])
        self.assertEqual(messages[0]["data"]["data"]["OldestId"], 11)
        self.assertEqual(
            [m["id"] for m in messages[1:]], [str(i) for i in range(11, 31)]
        )

    def test_bad_ids_are_refused(self):
        """Not a whole number: 400 naming the header or query."""
        for request, name in (
            (FakeRequest({b"Last-Event-ID": b"abc"}), "Last-Event-ID"),
            (FakeRequest({b"Last-Event-ID": b"-1"}), "Last-Event-ID"),
            (FakeRequest(args={b"since": [b"1e3"]}), "since"),
            (FakeRequest(args={b"since": [b"9" * 40]}), "since"),
        ):
            with self.assertRaises(StreamRefused) as caught:
                self.streams.open(request)
            self.assertEqual(caught.exception.status, 400)
            self.assertIn(name, caught.exception.message)
        self.assertEqual(self.streams.subscribers, [])

    def test_type_filter(self):
        """?type= keeps only the matching types, in the replay and live."""
        self.emit(1, EventType.LIMIT_HIT)
        self.emit(1, EventType.CLIENT_HEALTH)
        request = FakeRequest(args={b"type": [b"client.*,tunnel.failover"]})
        request.headers[b"last-event-id"] = b"0"
        self.streams.open(request)
        self.emit(1, EventType.TUNNELS_APPLIED)
        self.emit(1, EventType.TUNNEL_FAILOVER)
        self.assertEqual(request.events(), ["client.health", "tunnel.failover"])
        with self.assertRaises(StreamRefused) as caught:
            self.streams.open(FakeRequest(args={b"type": [b"Client!"]}))
        self.assertEqual(caught.exception.status, 400)

    def test_readers_are_bounded(self):
        """Past max_subscribers: 503, and a slot frees when a reader goes."""
        opened = [self.streams.open(FakeRequest()) for _ in range(3)]
        with self.assertRaises(StreamRefused) as caught:
            self.streams.open(FakeRequest())
        self.assertEqual(caught.exception.status, 503)
        self.assertIn("MaxEventSubscribers", caught.exception.message)
        # The reader goes away: Klein cancels the handler's Deferred.
        opened[0].cancel()
        self.failureResultOf(opened[0], CancelledError)
        self.assertEqual(len(self.streams.subscribers), 2)
        self.streams.open(FakeRequest())

    def test_slow_reader_backlog_then_flush(self):
        """Paused by its socket, a stream keeps events and writes them on resume."""
        request = FakeRequest()
        self.streams.open(request)
        request.producer.pauseProducing()
        self.emit(5)
        self.assertEqual(request.messages(), [])
        request.producer.resumeProducing()
        self.assertEqual(
            [m["id"] for m in request.messages()], ["1", "2", "3", "4", "5"]
        )

    def test_slow_reader_is_cut_past_its_backlog(self):
        """One event past max_backlog: stream.cut, the stream ends, memory freed."""
        request = FakeRequest()
        d = self.streams.open(request)
        self.emit(2)
        subscriber = request.producer
        subscriber.pauseProducing()
        self.emit(6)
        self.assertEqual(self.successResultOf(d), b"")
        self.assertEqual(request.events(), ["client.connected"] * 2 + ["stream.cut"])
        cut = request.messages()[-1]["data"]["data"]
        self.assertEqual(cut["LastSentId"], 2)
        self.assertIn("MaxEventBacklog", cut["Reason"])
        self.assertEqual(len(subscriber.backlog), 0)
        self.assertEqual(self.streams.subscribers, [])
        self.assertIsNone(request.producer)
        self.assertEqual(self.streams.cuts, 1)
        self.emit()  # nothing more is written
        self.assertEqual(len(request.messages()), 3)

    def test_keepalive_comments(self):
        """A comment every keepalive seconds, while the socket takes it."""
        request = FakeRequest()
        self.streams.open(request)
        self.clock.advance(15)
        self.assertTrue(request.written.endswith(b": keepalive\n\n"))
        size = len(request.written)
        request.producer.pauseProducing()
        self.clock.advance(15)
        self.assertEqual(len(request.written), size)

    def test_stop_ends_every_stream_cleanly(self):
        """At stop each stream gets stream.closed and its Deferred fires."""
        requests = [FakeRequest() for _ in range(2)]
        ds = [self.streams.open(r) for r in requests]
        self.emit()
        self.feed.close()
        for request, d in zip(requests, ds, strict=True):
            self.assertEqual(self.successResultOf(d), b"")
            self.assertEqual(request.events(), ["client.connected", "stream.closed"])
            self.assertEqual(request.messages()[-1]["data"]["data"]["LastId"], 1)
        self.assertEqual(self.streams.subscribers, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_head_answers_at_once(self):
        """HEAD /events: the stream's headers, no stream held open."""
        request = FakeRequest()
        request.method = b"HEAD"
        self.assertEqual(self.successResultOf(self.streams.open(request)), b"")
        self.assertEqual(
            request.response_headers[b"content-type"],
            b"text/event-stream; charset=utf-8",
        )
        self.assertEqual((request.written, self.streams.subscribers), (b"", []))

    def test_opened_after_stop_replays_and_ends(self):
        """A stream opened while stopping: what it missed, then stream.closed."""
        self.emit(2)
        self.feed.close()
        request = FakeRequest({b"last-event-id": b"1"})
        self.assertEqual(self.successResultOf(self.streams.open(request)), b"")
        self.assertEqual(request.events(), ["client.connected", "stream.closed"])
