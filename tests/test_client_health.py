"""The control channel on the client: health lines at session start and on change.

In memory: a HealthMonitor with a probe the test answers, client sessions
joined to fake gateways (tests/clientkit.py) that record every line the
client sends on stream 1 after the hello.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.clientkit import connect, make_settings
from tests.test_health import DB, WEB, FakeProbe
from threshold.client.gateway import GatewayLink, LinkState
from threshold.client.health import HealthMonitor
from threshold.client.session import ClientSession, ControlChannel, SessionState
from threshold.config.client import HealthCheck
from threshold.mux.session import GO_AWAY_NORMAL
from threshold.mux.stream import StreamReset
from threshold.testing import Collector
from threshold.wire.handshake import MAX_LINE, encode_hello_reply, encode_stream_header

WEB_UP = b'{"health":{"web":true}}\n'
WEB_UP_DB_DOWN = (
    b'{"health":{"web":true,"db":false},'
    b'"detail":{"db":"connection refused at 127.0.0.1:5432"}}\n'
)
BOTH_UP = b'{"health":{"web":true,"db":true}}\n'


def monitored(clock: Clock | None = None):
    """Settings whose monitor checks web and db with a FakeProbe (started)."""
    clock = clock or Clock()
    probe = FakeProbe()
    services = {"web": WEB, "db": DB}
    checks = {"web": HealthCheck(), "db": HealthCheck()}
    monitor = HealthMonitor(checks, services, clock, probe)
    settings = make_settings(clock=clock, services=services, health=monitor)
    monitor.startService()
    return settings, monitor, probe


class SessionStartTests(SynchronousTestCase):
    def test_full_state_after_hello(self):
        """A new session sends the full state right after its hello is accepted."""
        settings, monitor, probe = monitored()
        probe.succeed()
        probe.refuse()
        c = connect(settings=settings)
        self.assertIs(c.client.state, SessionState.ACCEPTED)
        self.assertEqual(c.control_lines, [WEB_UP_DB_DOWN])
        monitor.stopService()

    def test_nothing_until_first_result(self):
        """A session up before any result sends nothing; the first result follows."""
        settings, monitor, probe = monitored()
        c = connect(settings=settings)
        self.assertEqual(c.control_lines, [])
        probe.succeed()
        c.pump.flush()
        self.assertEqual(c.control_lines, [WEB_UP])
        monitor.stopService()

    def test_no_checks_no_lines(self):
        """Without HealthChecks nothing is sent, and stream 1 stays open."""
        c = connect()
        self.assertEqual(c.control_lines, [])
        self.assertIsNotNone(c.client.control)
        self.assertFalse(c.answers[0].lost)
        self.assertIn(1, c.session.streams)

    def test_nothing_before_hello_accepted(self):
        """No health line goes out before the answer, nor after a refusal."""
        settings, monitor, probe = monitored()
        probe.succeed()
        c = connect(settings=settings, reply=encode_hello_reply(False, "no"))
        self.assertEqual(c.control_lines, [])
        probe.pending.pop(0).errback(ConnectionRefusedError())
        c.pump.flush()
        self.assertEqual(c.control_lines, [])
        self.assertEqual(monitor._listeners, [])
        monitor.stopService()


class ChangeTests(SynchronousTestCase):
    def test_change_sent_at_once(self):
        """A service turning unhealthy, then healthy, is sent at once each time."""
        settings, monitor, probe = monitored()
        probe.succeed()
        probe.succeed()
        c = connect(settings=settings)
        self.assertEqual(c.control_lines, [BOTH_UP])
        settings.clock.advance(5)
        probe.succeed()
        probe.refuse()
        c.pump.flush()
        self.assertEqual(c.control_lines, [BOTH_UP, WEB_UP_DB_DOWN])
        settings.clock.advance(5)
        probe.succeed()
        probe.succeed()
        c.pump.flush()
        self.assertEqual(c.control_lines, [BOTH_UP, WEB_UP_DB_DOWN, BOTH_UP])
        monitor.stopService()

    def test_every_session_gets_it(self):
        """Sessions to three gateways each get every change, from one check."""
        settings, monitor, probe = monitored()
        probe.succeed()
        probe.succeed()
        sessions = [
            connect(settings=settings, link=GatewayLink(f"gw{i}:9056", settings.clock))
            for i in range(3)
        ]
        settings.clock.advance(5)
        self.assertEqual(len(probe.calls), 4)  # two checks each time, not six
        probe.succeed()
        probe.refuse()
        for c in sessions:
            c.pump.flush()
            self.assertEqual(c.control_lines, [BOTH_UP, WEB_UP_DB_DOWN])
        monitor.stopService()

    def test_ended_session_unsubscribed(self):
        """A session that ended gets nothing more; the others still do."""
        settings, monitor, probe = monitored()
        probe.succeed()
        probe.succeed()
        first = connect(settings=settings)
        second = connect(settings=settings, link=GatewayLink("gw2:1", settings.clock))
        self.assertEqual(len(monitor._listeners), 2)
        first.server.transport.loseConnection()
        first.pump.flush()
        self.assertIs(first.client.state, SessionState.CLOSED)
        self.assertEqual(len(monitor._listeners), 1)
        settings.clock.advance(5)
        probe.succeed()
        probe.refuse()
        second.pump.flush()
        self.assertEqual(first.control_lines, [BOTH_UP])
        self.assertEqual(second.control_lines, [BOTH_UP, WEB_UP_DB_DOWN])
        monitor.stopService()

    def test_live_config_removal_reported(self):
        """A service removed by live config leaves the next line."""
        settings, monitor, probe = monitored()
        probe.succeed()
        probe.refuse()
        c = connect(settings=settings)
        settings.replace_services({"web": WEB})
        c.pump.flush()
        self.assertEqual(c.control_lines, [WEB_UP_DB_DOWN, WEB_UP])
        self.assertEqual(settings.services, {"web": WEB})
        monitor.stopService()


class OlderGatewayTests(SynchronousTestCase):
    def test_stream_1_closed_after_reply(self):
        """A gateway that FINs stream 1 after its reply: the session goes on."""
        settings, monitor, probe = monitored()
        probe.succeed()
        c = connect(settings=settings, close_after_reply=True)
        self.assertIs(c.client.state, SessionState.ACCEPTED)
        self.assertFalse(c.session.closed)
        self.assertIsNone(c.client.control)
        self.assertNotIn(1, c.session.streams)
        self.assertEqual(monitor._listeners, [])
        # A change later finds no channel and is no error.
        probe.refuse()
        c.pump.flush()
        self.assertIs(c.client.state, SessionState.ACCEPTED)
        self.assertIs(c.link.state, LinkState.CONNECTED)
        monitor.stopService()


class GatewayLinesTests(SynchronousTestCase):
    def test_lines_from_gateway_ignored(self):
        """Known, unknown and malformed lines from the gateway change nothing."""
        c = connect()
        stream_1 = c.answers[0].transport
        for line in [
            b'{"notice":"draining"}\n',
            b'{"health":{"web":true}}\n',
            b"not json\n",
            b'{"health":5}\n',
        ]:
            stream_1.write(line)
        c.pump.flush()
        self.assertIs(c.client.state, SessionState.ACCEPTED)
        self.assertIsNotNone(c.client.control)
        self.assertIn(1, c.session.streams)

    def test_overlong_line_closes_only_the_channel(self):
        """A line longer than MAX_LINE resets stream 1, not the session."""
        c = connect()
        c.answers[0].transport.write(b"x" * (MAX_LINE + 1))
        c.pump.flush()
        self.assertIsInstance(c.answers[0].lost.value, StreamReset)
        self.assertIsNone(c.client.control)
        self.assertNotIn(1, c.session.streams)
        self.assertIs(c.client.state, SessionState.ACCEPTED)
        self.assertFalse(c.session.closed)


class BackpressureTests(SynchronousTestCase):
    def test_latest_line_only_while_paused(self):
        """While the stream is full only the latest line waits, then goes."""
        client = ClientSession(make_settings(), GatewayLink("gw:1", Clock()))
        channel = ControlChannel(client)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.assertIs(transport.producer, channel)
        channel.send(b"one\n")
        channel.pauseProducing()
        channel.send(b"two\n")
        channel.send(b"three\n")
        self.assertEqual(transport.value(), b"one\n")
        channel.resumeProducing()
        self.assertEqual(transport.value(), b"one\nthree\n")
        channel.resumeProducing()
        self.assertEqual(transport.value(), b"one\nthree\n")

    def test_gateway_not_reading(self):
        """A gateway that stops reading stream 1 holds the client to one line."""
        c = connect()
        gateway_side = c.answers[0]
        gateway_side.transport.pauseProducing()
        line = b'{"health":{"web":true}}\n'
        for i in range(20000):  # far more than the stream's 256 KiB window
            c.client.control.send(line if i % 2 else b'{"health":{"web":false}}\n')
        c.pump.flush()
        stream_1 = c.session.streams[1]
        unsent, _ = stream_1.buffered()
        self.assertLessEqual(unsent, len(line) + 1)
        gateway_side.transport.resumeProducing()
        c.pump.flush()
        lines = gateway_side.lines
        self.assertLess(len(lines), 20000)
        self.assertEqual(lines[-1], line)  # the latest state arrived last
        self.assertEqual(stream_1.buffered(), (0, 0))


class GatewayIdTests(SynchronousTestCase):
    def test_id_in_label(self):
        """The reply's gateway id names the gateway in logs and the session."""
        c = connect(reply=encode_hello_reply(True, gateway="eu-1"))
        self.assertEqual(c.link.gateway_id, "eu-1")
        self.assertEqual(c.link.label, "server:9056 (gateway eu-1)")
        self.assertEqual(c.session.name, "session to server:9056 (gateway eu-1)")

    def test_no_id(self):
        """An older gateway's reply has none: host:port alone."""
        c = connect()
        self.assertIsNone(c.link.gateway_id)
        self.assertEqual(c.link.label, "server:9056")


class GoAwayTests(SynchronousTestCase):
    def test_draining_then_waiting(self):
        """Go Away (stream 1 closed first, as a gateway does) ends the session."""
        c = connect()
        self.assertIs(c.link.state, LinkState.CONNECTED)
        c.answers[0].transport.loseConnection()
        c.server.go_away(GO_AWAY_NORMAL)
        c.pump.flush()
        self.assertTrue(c.session.closed)
        self.assertIs(c.link.state, LinkState.WAITING)
        self.assertIn("session ended", c.link.last_error)

    def test_client_closes_stream_1(self):
        """On Go Away the client closes stream 1 itself and stops reporting."""
        settings, monitor, probe = monitored()
        probe.succeed()
        c = connect(settings=settings)
        c.server.go_away(GO_AWAY_NORMAL)
        c.pump.flush()
        self.assertTrue(c.answers[0].read_closed)  # the client's FIN
        self.assertEqual(monitor._listeners, [])
        # A gateway that never closes its side: stream 1 lingers, then the
        # session ends all the same.
        self.assertIs(c.link.state, LinkState.DRAINING)
        c.clock.advance(settings.session_config.stream_linger)
        c.pump.flush()
        self.assertTrue(c.session.closed)
        self.assertIs(c.link.state, LinkState.WAITING)
        monitor.stopService()

    def test_draining_while_streams_run(self):
        """With a user's stream still open the session drains before it ends."""
        c = connect()
        user = Collector()
        c.server.open_stream(user).write(encode_stream_header("web"))
        c.pump.flush()
        c.server.go_away(GO_AWAY_NORMAL)
        c.pump.flush()
        self.assertIs(c.link.state, LinkState.DRAINING)
        self.assertFalse(c.session.closed)


class LogLineTests(SynchronousTestCase):
    """Every line about a session names its gateway (and its id, once known)."""

    def setUp(self):
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_session_lines(self):
        """Connected, up, a stream reset, down: each names host:port and id."""
        c = connect(reply=encode_hello_reply(True, gateway="eu-1"))
        user = Collector()
        c.server.open_stream(user).write(encode_stream_header("nope"))
        c.pump.flush()
        c.server.transport.loseConnection()
        c.pump.flush()
        lines = [line for line in self.lines() if "server:9056" in line]
        self.assertTrue(lines[0].startswith("connected to server:9056; sending"))
        self.assertEqual(
            lines[1], "tunnel to server:9056 (gateway eu-1) up as client TestClient1"
        )
        self.assertTrue(
            lines[2].startswith(
                "session to server:9056 (gateway eu-1): stream 2:"
                ' unknown service "nope"'
            ),
            lines[2],
        )
        self.assertTrue(
            any(
                line.startswith("tunnel to server:9056 (gateway eu-1) down")
                for line in lines
            )
        )

    def test_refusal_line(self):
        """A refused hello is logged with the gateway's address."""
        connect(reply=encode_hello_reply(False, "unknown client"))
        self.assertIn(
            "server:9056: server refused the hello: unknown client", self.lines()
        )
