"""The per-connection summary line: its text, its fields, LogConnections."""

from __future__ import annotations

import io
import json

from twisted.logger import (
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.trial.unittest import SynchronousTestCase

from tests.frontendkit import Gateway, entry
from threshold import logs
from threshold.config import server as server_config
from threshold.schema import SchemaError
from threshold.server.frontend import FrontendLimits

SUMMARY = "203.0.113.9:{port} on 127.0.0.1:9000 * via c/web: {n} bytes in, 3 out, "


class Events:
    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        test.addCleanup(logs.set_debug, False)

    def summaries(self) -> list[dict]:
        return [e for e in self.events if "bytes_out" in e and "duration" in e]


def relay_one(gateway: Gateway, sent: bytes = b"hello") -> object:
    user = gateway.connect(sent=sent)
    gateway.accepted[0].transport.write(b"abc")
    gateway.pump.flush()
    gateway.clock.advance(0.25)
    user.transport.loseConnection()
    gateway.pump.flush()
    return user


class SummaryLineTests(SynchronousTestCase):
    def test_text_and_fields(self):
        """One info line: the text as before, every field for JSON observers."""
        events = Events(self)
        gateway = Gateway([entry()])
        user = relay_one(gateway)
        [event] = events.summaries()
        port = user.transport.getPeer().port
        self.assertEqual(
            formatEvent(event), SUMMARY.format(port=port, n=5) + "0.250s, closed"
        )
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["log_namespace"], "threshold.server.frontend")
        fields = {
            k: event[k] for k in ("peer", "group", "glob", "client", "service", "end")
        }
        self.assertEqual(
            fields,
            {
                "peer": f"203.0.113.9:{port}",
                "group": "127.0.0.1:9000",
                "glob": "*",
                "client": "c",
                "service": "web",
                "end": "closed",
            },
        )
        self.assertEqual((event["bytes_in"], event["bytes_out"]), (5, 3))
        self.assertAlmostEqual(event["duration"], 0.25)

    def test_json_lines_carry_the_fields(self):
        """The JSON observer writes the fields and the formatted text."""
        events = Events(self)
        relay_one(Gateway([entry()]))
        [event] = events.summaries()
        out = io.StringIO()
        jsonFileLogObserver(out, recordSeparator="")(event)
        record = json.loads(out.getvalue())
        self.assertEqual((record["bytes_in"], record["client"]), (5, "c"))
        self.assertIn("5 bytes in, 3 out", record["text"])

    def test_braces_in_names_are_not_formatted(self):
        """A service name with braces shows as is (the text is not a format)."""
        events = Events(self)
        gateway = Gateway([entry(service="{x}")])
        relay_one(gateway)
        [event] = events.summaries()
        self.assertIn("via c/{x}:", formatEvent(event))

    def test_off_with_log_connections_false(self):
        """LogConnections false: no summary line, the counters still count."""
        events = Events(self)
        gateway = Gateway([entry()], limits=FrontendLimits(log_connections=False))
        relay_one(gateway)
        self.assertEqual(events.summaries(), [])
        self.assertEqual(gateway.stats.tunnels[("127.0.0.1", 9000, "*")].bytes_in, 5)

    def test_config_field(self):
        """LogConnections is on unless the file says false."""
        base = {"UseTls": False}
        self.assertTrue(server_config.SERVER.parse(base).log_connections)
        off = server_config.SERVER.parse({**base, "LogConnections": False})
        self.assertFalse(off.log_connections)
        with self.assertRaises(SchemaError):
            server_config.SERVER.parse({**base, "LogConnections": "no"})

    def test_route_debug_line_only_when_debugging(self):
        """The routing debug line is built only with DebugLog on."""
        events = Events(self)
        relay_one(Gateway([entry()]))
        routed = [e for e in events.events if "stream_id" in e and "client" in e]
        self.assertEqual(routed, [])
        logs.set_debug(True)
        relay_one(Gateway([entry()]))
        routed = [e for e in events.events if "stream_id" in e and "client" in e]
        self.assertEqual(len(routed), 1)


class EmitLineTests(SynchronousTestCase):
    def test_filtered_like_any_event(self):
        """emit_line goes through threshold's level filter."""
        events = Events(self)
        log = Logger(namespace="threshold.test", observer=logs.observer)
        logs.emit_line(log, LogLevel.debug, "hidden", n=1)
        logs.emit_line(log, LogLevel.info, "shown {x}", n=2)
        mine = [e for e in events.events if e.get("log_namespace") == "threshold.test"]
        self.assertEqual([formatEvent(e) for e in mine], ["shown {x}"])
        self.assertEqual(mine[0]["n"], 2)
        self.assertIsInstance(mine[0]["log_time"], float)

    def test_debugging_follows_set_debug(self):
        """debugging() says what set_debug set."""
        self.addCleanup(logs.set_debug, False)
        self.assertFalse(logs.debugging())
        logs.set_debug(True)
        self.assertTrue(logs.debugging())
