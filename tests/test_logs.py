"""Logging: the DebugLog switch, frame detail, JSON lines."""

from __future__ import annotations

import io
import json
import sys

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from threshold import logs
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.testing import Collector
from threshold.wire import frames as F


class Captured:
    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        test.addCleanup(logs.set_debug, False)

    def formats(self) -> list[str]:
        return [e.get("log_format", "") for e in self.events]


class DebugSwitchTests(SynchronousTestCase):
    def test_debug_only_with_debug_log(self):
        """Debug events of threshold pass only when DebugLog is on."""
        captured = Captured(self)
        log = Logger(namespace="threshold.test", observer=logs.observer)
        log.debug("hidden")
        log.info("shown")
        logs.set_debug(True)
        log.debug("now shown")
        self.assertEqual(
            [f for f in captured.formats() if f in ("hidden", "shown", "now shown")],
            ["shown", "now shown"],
        )

    def test_frames_logged_with_debug_frames(self):
        """With debug_frames, every frame sent and received is logged."""
        captured = Captured(self)
        logs.set_debug(True)
        session = MuxSession(
            client=True,
            clock=Clock(),
            handler=StreamAcceptor(lambda s: Collector()),
            config=SessionConfig(keepalive_interval=0, debug_frames=True),
        )
        session.makeConnection(StringTransport())
        session.open_stream(Collector()).write(b"abc")
        session.dataReceived(F.encode_header(F.TYPE_PING, F.FLAG_SYN, 0, 7))
        lines = [
            (e["what"], e["type"], e["flags"], e["stream_id"], e["length"])
            for e in captured.events
            if "what" in e and "stream_id" in e
        ]
        self.assertEqual(
            lines,
            [
                ("sent", "WindowUpdate", "SYN", 1, 0),
                ("sent", "Data", "-", 1, 3),
                ("received", "Ping", "SYN", 0, 7),
                ("sent", "Ping", "ACK", 0, 7),
            ],
        )


class JsonLinesTests(SynchronousTestCase):
    def test_one_json_object_per_line(self):
        """The JSON observer writes one parseable object per line."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = logs.json_lines()
        log = Logger(namespace="threshold.test", observer=observer)
        log.info("client {client_id} connected", client_id="TestClient1")
        log.info("bytes {n}", n=5)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual(first["client_id"], "TestClient1")
        self.assertEqual(first["log_namespace"], "threshold.test")
        self.assertEqual(json.loads(lines[1])["n"], 5)
