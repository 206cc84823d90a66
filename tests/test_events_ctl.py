"""``threshold-ctl events`` against a real gateway, and its SSE parser."""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import Backend, Deployment, free_port, tunnel, wait_until
from threshold.ctl.cli import run
from threshold.ctl.events import SseParser, format_event
from threshold.server.events_service import EventService

CLIENT = "TestClient1"


class ParserTests(SynchronousTestCase):
    """The text/event-stream format, however the bytes are cut."""

    STREAM = (
        b": threshold events\nretry: 1000\n\n"
        b'id: 1\nevent: client.connected\ndata: {"id":1}\n\n'
        b": keepalive\n\n"
        b'id: 2\r\nevent: limit.hit\r\ndata: {"id":2}\r\n\r\n'
        b'event: stream.reset\rdata: {"id":0}\r\r: keepalive\n'
    )

    def test_whole_and_byte_by_byte(self):
        """The same messages, fed at once or one byte at a time."""
        whole = SseParser().feed(self.STREAM)
        parser = SseParser()
        pieces = []
        for i in range(len(self.STREAM)):
            pieces.extend(parser.feed(self.STREAM[i : i + 1]))
        for messages in (whole, pieces):
            self.assertEqual(
                [(m.id, m.event, m.data) for m in messages],
                [
                    ("1", "client.connected", ['{"id":1}']),
                    ("2", "limit.hit", ['{"id":2}']),
                    (None, "stream.reset", ['{"id":0}']),
                ],
            )

    @given(st.lists(st.integers(0, len(STREAM)), max_size=12))
    def test_any_fragmentation(self, cuts):
        """Cut anywhere, the same messages come out."""
        bounds = [0, *sorted(cuts), len(self.STREAM)]
        parser = SseParser()
        messages = []
        for start, end in zip(bounds, bounds[1:], strict=False):
            messages.extend(parser.feed(self.STREAM[start:end]))
        self.assertEqual(
            [(m.id, m.event) for m in messages],
            [("1", "client.connected"), ("2", "limit.hit"), (None, "stream.reset")],
        )

    def test_line_too_long(self):
        """A line without end past the bound is an error, not memory."""
        parser = SseParser()
        with self.assertRaises(ValueError):
            parser.feed(b"data: " + b"x" * (1024 * 1024 + 1))

    def test_format_event(self):
        """One line: time, id, type, then Key=value with JSON where needed."""
        line = format_event(
            {
                "id": 7,
                "type": "client.health",
                "time": "2026-12-02T01:00:00.000Z",
                "data": {
                    "ClientId": "home-a",
                    "Healthy": False,
                    "Detail": "connection refused\nat x",
                },
            }
        )
        self.assertEqual(
            line,
            "2026-12-02T01:00:00.000Z       7  client.health  ClientId=home-a"
            ' Healthy=false Detail="connection refused\\nat x"',
        )


class EventsCommandTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.deployment = Deployment(True, self.mktemp())
        self.deployment.start_server()
        self.addCleanup(self.deployment.stop)

    def argv(self, *more: str) -> list[str]:
        pki = self.deployment.pki
        return [
            "--server",
            f"https://localhost:{self.deployment.management_port}",
            "--ca",
            pki.ca_cert,
            "--cert",
            pki.client_cert("operator"),
            "--key",
            pki.client_key("operator"),
            "events",
            *more,
        ]

    def ctl(self, *more: str) -> tuple[Any, io.StringIO, io.StringIO]:
        out, err = io.StringIO(), io.StringIO()
        d = run(reactor, self.argv(*more), stdout=out, stderr=err, environ={})
        return d, out, err

    @inlineCallbacks
    def start_client(self) -> Any:
        backend = Backend()
        port = yield backend.start()
        self.addCleanup(backend.stop)
        self.deployment.start_client(CLIENT, {"web": ("127.0.0.1", port)})
        yield self.deployment.wait_connected(CLIENT)

    @inlineCallbacks
    def test_since_count_json(self):
        """--since 0 --count 2 --json: the first two events kept, as JSON."""
        yield self.start_client()
        yield self.deployment.put_tunnels([tunnel(CLIENT, free_port(), "web")])
        d, out, err = self.ctl("--since", "0", "--count", "2", "--json")
        status = yield d
        self.assertEqual(status, 0, err.getvalue())
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(
            [e["type"] for e in events], ["client.connected", "tunnels.applied"]
        )
        self.assertEqual(events[1]["id"], events[0]["id"] + 1)

    @inlineCallbacks
    def test_type_filter_and_lines(self):
        """--type tunnels.*: only those, one line each."""
        yield self.start_client()
        yield self.deployment.put_tunnels([tunnel(CLIENT, free_port(), "web")])
        d, out, err = self.ctl("--since", "0", "--type", "tunnels.*", "--count", "1")
        self.assertEqual((yield d), 0, err.getvalue())
        [line] = out.getvalue().splitlines()
        self.assertRegex(line, r"^\S+Z\s+\d+  tunnels\.applied  Revision=1 Tunnels=1 ")

    @inlineCallbacks
    def test_resumes_after_the_stream_is_cut(self):
        """The server cuts the stream: the command reconnects with
        Last-Event-ID and prints what happened meanwhile, once."""
        d, out, err = self.ctl("--count", "3", "--json")
        service = [
            s for s in self.deployment.server_service if isinstance(s, EventService)
        ][0]
        yield wait_until(lambda: service.streams.subscribers, 10, "the stream")
        yield self.start_client()
        yield wait_until(lambda: "client.connected" in out.getvalue(), 10, "event")
        service.streams.subscribers[0].request.channel.transport.abortConnection()
        yield wait_until(lambda: not service.streams.subscribers, 10, "cut")
        yield self.deployment.stop_client(CLIENT)
        yield self.start_client()
        self.assertEqual((yield d), 0, err.getvalue())
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(
            [e["type"] for e in events],
            ["client.connected", "client.disconnected", "client.connected"],
        )
        first = events[0]["id"]
        self.assertEqual([e["id"] for e in events], [first, first + 1, first + 2])
        self.assertIn("reconnecting in 1s", err.getvalue())

    @inlineCallbacks
    def test_usage_errors(self):
        """A bad --type or --since: exit 2 before anything is sent."""
        d, out, err = self.ctl("--type", "Client!")
        self.assertEqual((yield d), 2)
        self.assertIn("--type 'Client!'", err.getvalue())
        d, out, err = self.ctl("--since", "abc")
        self.assertEqual((yield d), 2)
        self.assertIn("not an event id", err.getvalue())

    @inlineCallbacks
    def test_unreachable_at_first_is_an_error(self):
        """Nothing listening: exit 3 at once, no endless retrying."""
        out, err = io.StringIO(), io.StringIO()
        argv = self.argv()
        argv[1] = f"https://localhost:{free_port()}"
        status = yield run(reactor, argv, stdout=out, stderr=err, environ={})
        self.assertEqual(status, 3)
        self.assertIn("connection refused", err.getvalue())
