"""The client's health checks: timing, transitions, the shared line, live config.

In memory (a Clock and a probe the test answers), then the real TCP probe:
on a MemoryReactorClock for its timeout, on loopback for a listening and a
closed port.
"""

from __future__ import annotations

import json
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import (
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TimeoutError,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from threshold.client.health import (
    CheckState,
    HealthMonitor,
    ServiceCheck,
    describe_failure,
    tcp_probe,
)
from threshold.config.client import HealthCheck

WEB = ("127.0.0.1", 8080)
DB = ("127.0.0.1", 5432)


class FakeProbe:
    """A probe whose every attempt the test answers (or leaves hanging)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []
        self.pending: list[Deferred] = []

    def __call__(self, host: str, port: int, timeout: float) -> Deferred:
        self.calls.append((host, port, timeout))
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def succeed(self) -> None:
        self.pending.pop(0).callback(None)

    def refuse(self) -> None:
        self.pending.pop(0).errback(ConnectionRefusedError("refused"))

    def time_out(self) -> None:
        self.pending.pop(0).errback(TimeoutError())


def make_check(probe: FakeProbe, clock: Clock, interval=5.0, timeout=2.0):
    #: The state after each result.
    changes: list[CheckState] = []
    check = ServiceCheck(
        "web",
        WEB,
        HealthCheck(interval_seconds=interval, timeout_seconds=timeout),
        clock,
        probe,
        lambda c: changes.append(c.state),
    )
    return check, changes


class ServiceCheckTests(SynchronousTestCase):
    def test_first_check_at_start_then_every_interval(self):
        """The first check runs at start; then one every IntervalSeconds."""
        clock, probe = Clock(), FakeProbe()
        check, _ = make_check(probe, clock)
        self.assertEqual(probe.calls, [])
        check.start()
        self.assertEqual(probe.calls, [("127.0.0.1", 8080, 2.0)])
        probe.succeed()
        clock.advance(4.9)
        self.assertEqual(len(probe.calls), 1)
        clock.advance(0.1)
        self.assertEqual(len(probe.calls), 2)
        probe.succeed()
        clock.advance(5)
        self.assertEqual(len(probe.calls), 3)
        check.stop()

    def test_no_overlap(self):
        """A check still running when the interval ends delays the next one."""
        clock, probe = Clock(), FakeProbe()
        check, _ = make_check(probe, clock, interval=1.0, timeout=1.0)
        check.start()
        clock.advance(3)
        self.assertEqual(len(probe.calls), 1)
        probe.time_out()
        clock.advance(1)
        self.assertEqual(len(probe.calls), 2)
        check.stop()

    def test_results(self):
        """Each result is reported to the owner, with its state and time."""
        clock, probe = Clock(), FakeProbe()
        check, changes = make_check(probe, clock)
        self.assertIs(check.state, CheckState.UNKNOWN)
        self.assertIsNone(check.last_checked)
        check.start()
        clock.advance(1)
        probe.succeed()
        self.assertEqual(changes, [CheckState.HEALTHY])
        self.assertEqual(check.last_checked, 1)
        for answer in (probe.succeed, probe.refuse, probe.time_out, probe.succeed):
            clock.advance(5)
            answer()
        H, U = CheckState.HEALTHY, CheckState.UNHEALTHY
        self.assertEqual(changes, [H, H, U, U, H])
        self.assertEqual(check.checks, 5)
        self.assertEqual(check.last_checked, 21)
        self.assertIsNone(check.detail)
        check.stop()

    def test_detail_of_latest_failure(self):
        """An unhealthy check keeps the latest failure's words."""
        clock, probe = Clock(), FakeProbe()
        check, changes = make_check(probe, clock)
        check.start()
        probe.refuse()
        self.assertEqual(check.detail, "connection refused at 127.0.0.1:8080")
        clock.advance(5)
        probe.time_out()
        self.assertEqual(check.detail, "no answer within 2s from 127.0.0.1:8080")
        self.assertEqual(changes, [CheckState.UNHEALTHY] * 2)
        check.stop()

    def test_stop_cancels_running_probe(self):
        """Stopping cancels the probe under way; its result is dropped."""
        clock, probe = Clock(), FakeProbe()
        check, changes = make_check(probe, clock)
        check.start()
        running = probe.pending[0]
        check.stop()
        self.assertTrue(running.called)  # cancelled
        self.assertEqual(changes, [])
        self.assertIs(check.state, CheckState.UNKNOWN)
        clock.advance(60)
        self.assertEqual(len(probe.calls), 1)
        self.assertFalse(check.active)

    def test_probe_raising_is_a_failure(self):
        """A probe that raises counts as a failed check, not a crash."""
        clock = Clock()

        def probe(host, port, timeout):
            raise OSError("no sockets left")

        check = ServiceCheck("web", WEB, HealthCheck(), clock, probe, lambda c: None)
        check.start()
        self.assertIs(check.state, CheckState.UNHEALTHY)
        self.assertIn("no sockets left", check.detail)
        check.stop()


class DescribeTests(SynchronousTestCase):
    def test_words(self):
        """Each kind of failure is said in plain words, naming the address."""
        cases = [
            (ConnectionRefusedError(), "connection refused at 127.0.0.1:8080"),
            (TimeoutError(), "no answer within 2s from 127.0.0.1:8080"),
            (DNSLookupError(), "cannot resolve 127.0.0.1"),
            (NoRouteError(), "no route to 127.0.0.1:8080"),
            (OSError("boom"), "cannot connect to 127.0.0.1:8080: boom"),
        ]
        for exc, words in cases:
            self.assertEqual(describe_failure(Failure(exc), *WEB, 2.0), words)
        self.assertEqual(
            describe_failure(Failure(ConnectionRefusedError()), "::1", 22, 1.5),
            "connection refused at [::1]:22",
        )
        self.assertEqual(
            describe_failure(Failure(TimeoutError()), "::1", 22, 1.5),
            "no answer within 1.5s from [::1]:22",
        )


def monitor_for(services, checks=None, probe=None, clock=None) -> tuple:
    clock = clock or Clock()
    probe = probe or FakeProbe()
    if checks is None:
        checks = {"web": HealthCheck(), "db": HealthCheck()}
    monitor = HealthMonitor(checks, services, clock, probe)
    lines: list[bytes] = []
    monitor.subscribe(lines.append)
    return monitor, probe, clock, lines


class HealthMonitorTests(SynchronousTestCase):
    def test_nothing_before_first_result(self):
        """Until a check has a result, there is nothing to report."""
        monitor, probe, clock, lines = monitor_for({"web": WEB, "db": DB})
        self.assertIsNone(monitor.current_line())
        monitor.startService()
        self.assertEqual(len(probe.calls), 2)
        self.assertIsNone(monitor.current_line())
        self.assertEqual(lines, [])
        monitor.stopService()

    def test_lines_on_changes(self):
        """Each change sends the full state of the services with a result."""
        monitor, probe, clock, lines = monitor_for({"web": WEB, "db": DB})
        monitor.startService()
        probe.succeed()  # web
        self.assertEqual(lines, [b'{"health":{"web":true}}\n'])
        probe.refuse()  # db
        self.assertEqual(
            lines[1],
            b'{"health":{"web":true,"db":false},'
            b'"detail":{"db":"connection refused at 127.0.0.1:5432"}}\n',
        )
        self.assertEqual(monitor.current_line(), lines[1])
        clock.advance(5)
        probe.succeed()
        probe.refuse()
        self.assertEqual(len(lines), 2)  # nothing changed
        clock.advance(5)
        probe.succeed()
        probe.time_out()  # another detail, same state: no message
        self.assertEqual(len(lines), 2)
        self.assertIn(b"no answer within 2s", monitor.current_line())
        clock.advance(5)
        probe.succeed()
        probe.succeed()
        self.assertEqual(lines[2], b'{"health":{"web":true,"db":true}}\n')
        monitor.stopService()

    def test_only_configured_and_mapped(self):
        """Services without a check are not listed; a check needs its service."""
        monitor, probe, clock, lines = monitor_for(
            {"web": WEB, "ssh": ("127.0.0.1", 22)}
        )
        self.assertEqual(set(monitor.checks), {"web"})
        monitor.startService()
        self.assertEqual(probe.calls, [("127.0.0.1", 8080, 2.0)])
        monitor.stopService()

    def test_unsubscribe(self):
        """An unsubscribed session gets nothing more."""
        monitor, probe, clock, lines = monitor_for({"web": WEB})
        other: list[bytes] = []
        unsubscribe = monitor.subscribe(other.append)
        monitor.startService()
        unsubscribe()
        unsubscribe()  # twice is harmless
        probe.refuse()
        self.assertEqual(len(lines), 1)
        self.assertEqual(other, [])
        monitor.stopService()

    def test_stop_service_stops_checks(self):
        """Stopping the monitor stops every check (and cancels running ones)."""
        monitor, probe, clock, lines = monitor_for({"web": WEB, "db": DB})
        monitor.startService()
        monitor.stopService()
        self.assertTrue(all(d.called for d in probe.pending))
        clock.advance(60)
        self.assertEqual(len(probe.calls), 2)
        self.assertEqual(lines, [])


class LiveConfigTests(SynchronousTestCase):
    """PUT /liveconfig replaces the map: the checks follow it."""

    def started(self):
        monitor, probe, clock, lines = monitor_for({"web": WEB, "db": DB})
        monitor.startService()
        probe.succeed()
        probe.refuse()
        del lines[:]
        return monitor, probe, clock, lines

    def test_removed_service_stops(self):
        """A service taken out of the map is no longer checked or reported."""
        monitor, probe, clock, lines = self.started()
        monitor.services_changed({"web": WEB})
        self.assertEqual(lines, [b'{"health":{"web":true}}\n'])
        clock.advance(5)
        self.assertEqual(probe.calls[-1][:2], WEB)
        self.assertEqual(len(probe.calls), 3)
        monitor.services_changed({})
        self.assertEqual(lines[-1], b'{"health":{}}\n')
        self.assertIsNone(monitor.current_line())
        monitor.stopService()

    def test_moved_service_checked_at_new_address(self):
        """A changed address is checked there at once; the state holds till then."""
        monitor, probe, clock, lines = self.started()
        running = len(probe.pending)
        monitor.services_changed({"web": ("127.0.0.2", 9090), "db": DB})
        self.assertEqual(probe.calls[-1], ("127.0.0.2", 9090, 2.0))
        self.assertEqual(len(probe.pending), running + 1)
        self.assertEqual(lines, [])  # still known healthy at the old address
        probe.pending.pop().errback(ConnectionRefusedError())
        self.assertEqual(
            lines,
            [
                b'{"health":{"web":false,"db":false},"detail":{'
                b'"web":"connection refused at 127.0.0.2:9090",'
                b'"db":"connection refused at 127.0.0.1:5432"}}\n'
            ],
        )
        monitor.stopService()

    def test_returning_service_starts_unknown(self):
        """A service back in the map is checked again from the start."""
        monitor, probe, clock, lines = self.started()
        monitor.services_changed({"web": WEB})
        monitor.services_changed({"web": WEB, "db": DB})
        self.assertIs(monitor.checks["db"].state, CheckState.UNKNOWN)
        self.assertEqual(probe.calls[-1], ("127.0.0.1", 5432, 2.0))
        self.assertEqual(lines, [b'{"health":{"web":true}}\n'])
        probe.pending.pop().callback(None)
        self.assertEqual(lines[-1], b'{"health":{"web":true,"db":true}}\n')
        monitor.stopService()

    def test_same_map_changes_nothing(self):
        """Replacing the map with an equal one neither restarts nor reports."""
        monitor, probe, clock, lines = self.started()
        calls = len(probe.calls)
        monitor.services_changed({"web": WEB, "db": DB, "other": ("h", 1)})
        self.assertEqual(len(probe.calls), calls)
        self.assertEqual(lines, [])
        monitor.stopService()

    def test_before_start(self):
        """A map changed before the tree starts only prepares the checks."""
        monitor, probe, clock, lines = monitor_for({"web": WEB})
        monitor.services_changed({"web": WEB, "db": DB})
        self.assertEqual(probe.calls, [])
        monitor.startService()
        self.assertEqual(len(probe.calls), 2)
        monitor.stopService()


class TcpProbeMemoryTests(SynchronousTestCase):
    def test_timeout(self):
        """No connection within the timeout fails the probe and cancels it."""
        memory = MemoryReactorClock()
        d = tcp_probe(memory)("127.0.0.1", 8080, 2.0)
        host, port, factory, timeout, _ = memory.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 2.0))
        memory.advance(1.9)
        self.assertNoResult(d)
        memory.advance(0.1)
        failure = self.failureResultOf(d)
        self.assertEqual(
            describe_failure(failure, "127.0.0.1", 8080, 2.0),
            "no answer within 2s from 127.0.0.1:8080",
        )
        # The attempt itself was called off, not left to run.
        self.assertTrue(memory.connectors[0].stoppedConnecting)

    def test_refused(self):
        """A refused connection fails the probe with ConnectionRefusedError."""
        memory = MemoryReactorClock()
        d = tcp_probe(memory)("127.0.0.1", 8080, 2.0)
        connector = memory.connectors[0]
        factory = memory.tcpClients[0][2]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(memory.getDelayedCalls(), [])


class TcpProbeLoopbackTests(TestCase):
    """The real probe against real sockets on 127.0.0.1."""

    timeout = 10

    @inlineCallbacks
    def test_listening_port(self):
        """A listening service passes, and the probe's connection is closed."""
        accepted: list[Protocol] = []
        closed: Deferred = Deferred()

        class Service(Protocol):
            def connectionMade(self):
                accepted.append(self)

            def connectionLost(self, reason):
                closed.callback(None)

        port = reactor.listenTCP(0, Factory.forProtocol(Service), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        result = yield tcp_probe(reactor)("127.0.0.1", port.getHost().port, 2.0)
        self.assertIsNone(result)
        yield closed
        self.assertEqual(len(accepted), 1)

    @inlineCallbacks
    def test_closed_port(self):
        """A closed port on 127.0.0.1 refuses at once, said so in plain words."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        checks = {"web": HealthCheck(interval_seconds=1, timeout_seconds=1)}
        monitor = HealthMonitor(
            checks, {"web": ("127.0.0.1", free)}, reactor, tcp_probe(reactor)
        )
        lines: list[bytes] = []
        got: Deferred = Deferred()

        def listener(line):
            lines.append(line)
            got.callback(None)

        monitor.subscribe(listener)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        yield got
        self.assertEqual(
            json.loads(lines[0]),
            {
                "health": {"web": False},
                "detail": {"web": f"connection refused at 127.0.0.1:{free}"},
            },
        )

    @inlineCallbacks
    def test_service_comes_up(self):
        """A service that starts listening is reported healthy at the next check."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        checks = {"web": HealthCheck(interval_seconds=1, timeout_seconds=0.5)}
        monitor = HealthMonitor(
            checks, {"web": ("127.0.0.1", free)}, reactor, tcp_probe(reactor)
        )
        lines: list[bytes] = []
        waiters: list[Deferred] = [Deferred(), Deferred()]

        def listener(line):
            lines.append(line)
            waiters.pop(0).callback(None)

        monitor.subscribe(listener)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        yield waiters[0]
        port = reactor.listenTCP(
            free, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        yield waiters[0]
        self.assertEqual(lines[1], b'{"health":{"web":true}}\n')
