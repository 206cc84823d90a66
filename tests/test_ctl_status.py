"""threshold-ctl status, --output json|table, and the progress line of tunnels put."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from tests.test_ctl import call
from threshold.ctl import EXIT_OK, run
from threshold.ctl.output import human_bytes, table
from threshold.ctl.progress import (
    INTERVAL,
    Phase,
    Progress,
    Steps,
    progress_for,
    steps_for,
)
from threshold.ctl.status import parse_traffic, render

CLIENT = "TestClient1"


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return True


class StatusDeploymentTests(TestCase):
    """status and --output against a real gateway with traffic."""

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(False, self.mktemp())
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        backend = Backend(echo=True)
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        self.deployment.start_client(CLIENT, {"web": ("127.0.0.1", backend_port)})
        yield self.deployment.wait_connected(CLIENT)
        self.port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel(CLIENT, self.port, "web"), tunnel("TestClient2", free_port(), "db")]
        )
        self.assertEqual(code, 200, body)
        # One user sends 1500 bytes and gets them back; the connection stays open.
        self.user = yield connect_user(self.port)
        self.addCleanup(self.user.transport.loseConnection)
        self.user.transport.write(b"x" * 1500)
        yield wait_until(lambda: len(self.user.data) == 1500, what="the echo")

    def ctl(self, *argv: str):
        url = f"http://127.0.0.1:{self.deployment.management_port}"
        return call(reactor, ["--server", url, *argv])

    @inlineCallbacks
    def test_status_table(self):
        """Clients and tunnels with state, serving, open connections and bytes."""
        result = yield self.ctl("status")
        self.assertEqual((result.status, result.err), (EXIT_OK, ""), result)
        lines = result.out.splitlines()
        self.assertLessEqual(max(len(line) for line in lines), 80, result.out)
        self.assertRegex(lines[0], r"^CLIENT +STATE +SINCE +RTT +STREAMS +HEALTH$")
        self.assertRegex(lines[1], r"^TestClient1 +connected +\d{4}-\d\d-\d\d ")
        self.assertRegex(
            result.out,
            rf"\n127\.0\.0\.1:{self.port} +web +no +TestClient1 +1 +1\.5 KB +1\.5 KB\n",
        )
        self.assertRegex(result.out, r"\n127\.0\.0\.1:\d+ +db +no +none +0 +0 B +0 B\n")

    @inlineCallbacks
    def test_status_json(self):
        """--output json: the API's answers together, Traffic per tunnel."""
        result = yield self.ctl("status", "--output", "json")
        self.assertEqual(result.status, EXIT_OK, result)
        status = json.loads(result.out)
        self.assertEqual(set(status), {"Clients", "Tunnels", "NotRestored"})
        self.assertEqual(status["Clients"][CLIENT]["CurrentState"], "ClientConnected")
        web = status["Tunnels"][0]
        self.assertEqual((web["ListenPort"], web["Serving"]), (self.port, [CLIENT]))
        self.assertEqual(
            web["Traffic"],
            {"Connections": 1, "OpenConnections": 1, "ReceivedBytes": 1500,
             "SentBytes": 1500},
        )  # fmt: skip
        self.assertEqual(
            status["Tunnels"][1]["Traffic"],
            dict.fromkeys(web["Traffic"], 0),
            "a tunnel without traffic yet has zeros",
        )

    @inlineCallbacks
    def test_existing_commands_keep_json(self):
        """clients and tunnels get print JSON unless asked for a table."""
        clients = yield self.ctl("clients")
        self.assertEqual(
            json.loads(clients.out)[CLIENT]["CurrentState"], "ClientConnected"
        )
        table_ = yield self.ctl("clients", "--output", "table")
        self.assertRegex(table_.out, r"\nTestClient1 +connected ")
        got = yield self.ctl("tunnels", "get", "--output", "table")
        self.assertEqual(got.status, EXIT_OK, got)
        self.assertRegex(
            got.out,
            r"^TUNNEL +SERVICE +PROXY +BALANCE +CLIENTS\n"
            rf"127\.0\.0\.1:{self.port} +web +no +failover +TestClient1\n",
        )
        ping = yield self.ctl("ping", "--output", "json")
        self.assertEqual(ping.out, '"pong"\n')
        plain = yield self.ctl("ping")
        self.assertEqual(plain.out, "pong\n")


class SlowPut(Resource):
    """PUT /tunnels answered after a delay: an API busy applying a large set."""

    isLeaf = True

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.received = 0

    def render_PUT(self, request: Any) -> Any:  # noqa: N802
        self.received = len(request.content.read())

        def answer() -> None:
            request.setHeader(b"content-type", b"application/json")
            request.write(b"[]")
            request.finish()

        reactor.callLater(self.delay, answer)
        return NOT_DONE_YET


class ProgressOnARealPutTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def put(self, stderr: io.StringIO):
        resource = SlowPut(delay=4 * INTERVAL)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(resource)
        )
        self.addCleanup(port.stopListening)
        body = json.dumps(
            [tunnel(CLIENT, 10000 + i, "web") for i in range(2000)]
        ).encode()
        out = io.StringIO()
        status = yield run(
            reactor,
            [
                "--server",
                f"http://127.0.0.1:{port.getHost().port}",
                "tunnels",
                "put",
                "-",
            ],
            stdin=io.BytesIO(body),
            stdout=out,
            stderr=stderr,
            environ={},
        )
        self.assertEqual((status, out.getvalue()), (EXIT_OK, "[]\n"))
        self.assertEqual(resource.received, len(body))
        return len(body)

    @inlineCallbacks
    def test_terminal_shows_waiting_then_erases(self):
        """On a terminal: the bytes sent and the wait, then the line is erased."""
        err = Terminal()
        size = yield self.put(err)
        text = err.getvalue()
        self.assertIn(
            f"\r\x1b[Ktunnels put: sent {human_bytes(size)}, waiting for the answer, ",
            text,
        )
        self.assertTrue(text.endswith("\r\x1b[K"), repr(text))

    @inlineCallbacks
    def test_not_a_terminal_shows_nothing(self):
        err = io.StringIO()
        yield self.put(err)
        self.assertEqual(err.getvalue(), "")


class ProgressTests(SynchronousTestCase):
    """The progress line's phases and words, on a Clock."""

    def test_phases(self):
        clock, err = Clock(), Terminal()
        progress = Progress(err, clock, "tunnels put", 2_000_000)
        clock.advance(INTERVAL / 2)
        self.assertEqual(err.getvalue(), "", "a quick call shows nothing")
        progress.on_sent(500_000)
        clock.advance(INTERVAL / 2)
        self.assertEqual(
            err.getvalue(), "\r\x1b[Ktunnels put: sending 500 KB of 2.0 MB (25%), 0.2 s"
        )
        progress.on_sent(1_500_000)
        self.assertIs(progress.phase, Phase.WAITING)
        clock.advance(INTERVAL * 4)
        self.assertTrue(
            err.getvalue().endswith(
                "\r\x1b[Ktunnels put: sent 2.0 MB, waiting for the answer, 1.2 s"
            )
        )
        progress.on_answer()
        progress.on_received(3000)
        clock.advance(INTERVAL)
        self.assertTrue(
            err.getvalue().endswith("receiving the answer, 3.0 KB, 1.5 s"),
            err.getvalue(),
        )
        progress.done()
        self.assertTrue(err.getvalue().endswith("\r\x1b[K"))
        before = err.getvalue()
        clock.advance(INTERVAL * 10)
        self.assertEqual(err.getvalue(), before, "nothing after done")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_done_before_any_draw_writes_nothing(self):
        clock, err = Clock(), Terminal()
        Progress(err, clock, "x", 10).done()
        self.assertEqual((err.getvalue(), clock.getDelayedCalls()), ("", []))

    def test_steps(self):
        """doctor's walk: items done of the total, then erased."""
        clock, err = Clock(), Terminal()
        steps = Steps(err, clock, "doctor: tunnels checked", 3000)
        for _ in range(120):
            steps.step()
        clock.advance(INTERVAL)
        self.assertEqual(
            err.getvalue(), "\r\x1b[Kdoctor: tunnels checked: 120 of 3000, 0.2 s"
        )
        steps.done()
        self.assertTrue(err.getvalue().endswith("\r\x1b[K"))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIsNone(steps_for(io.StringIO(), Clock(), "x", 1))

    def test_only_on_a_terminal(self):
        self.assertIsNone(progress_for(io.StringIO(), Clock(), "x", 1))
        self.assertIsInstance(progress_for(Terminal(), Clock(), "x", 1), Progress)
        closed = Terminal()
        closed.close()
        self.assertIsNone(progress_for(closed, Clock(), "x", 1))


class TableTests(SynchronousTestCase):
    def test_fits_by_cutting_the_flexible_column(self):
        rows = [("TestClient1", "connected", "x" * 100)]
        text = table(("CLIENT", "STATE", "HEALTH"), rows, width=40, flexible=(2,))
        lines = text.splitlines()
        self.assertEqual(max(len(line) for line in lines), 40)
        self.assertEqual(lines[1], "TestClient1  connected  " + "x" * 13 + "...")

    def test_cells(self):
        text = table(("A", "B"), [(None, True), ("two\nlines", False)])
        self.assertEqual(text, "A          B\n-          yes\ntwo lines  no\n")

    def test_human_bytes(self):
        self.assertEqual(
            [human_bytes(n) for n in (0, 999, 1500, 2_500_000, 123_000_000_000, None)],
            ["0 B", "999 B", "1.5 KB", "2.5 MB", "123 GB", "-"],
        )


class StatusRenderTests(SynchronousTestCase):
    METRICS = (
        "# TYPE threshold_tunnel_connections_open gauge\n"
        'threshold_tunnel_connections_open{listen_address="0.0.0.0",'
        'listen_port="443",hostname="www.example.com"} 3.0\n'
        "# TYPE threshold_tunnel_sent_bytes_total counter\n"
        'threshold_tunnel_sent_bytes_total{listen_address="0.0.0.0",'
        'listen_port="443",hostname="www.example.com"} 2048.0\n'
    )

    def test_parse_traffic(self):
        self.assertEqual(
            parse_traffic(self.METRICS),
            {("0.0.0.0", "443", "www.example.com"): {"OpenConnections": 3,
                                                     "SentBytes": 2048}},
        )  # fmt: skip

    def test_without_metrics_and_with_unhealthy_services(self):
        status = {
            "Clients": {
                "home-a": {
                    "CurrentState": "ClientClosed",
                    "LastChange": "2026-01-10T11:00:00Z",
                    "RttMilliseconds": None,
                    "OpenStreams": 0,
                    "Health": {"web": {"Healthy": False, "Detail": "timed out"}},
                }
            },
            "Tunnels": [
                {
                    "ListenAddress": "::",
                    "ListenPort": 443,
                    "ListenHostnameGlob": "*",
                    "BackEndService": "web",
                    "HaProxyProxyProtocol": True,
                    "HaProxyProxyProtocolVersion": 2,
                    "Serving": [],
                    "Traffic": None,
                }
            ],  # fmt: skip
            "NotRestored": [{"Index": 1, "Error": "entry 1: address in use"}],
        }
        text = render(status)
        self.assertIn(
            "home-a  closed  2026-01-10 11:00:00  -    0        web: timed out", text
        )
        self.assertIn("[::]:443  web      v2     none     -     -   -", text)
        self.assertIn("not restored: entry 1: entry 1: address in use", text)
