"""threshold-ctl doctor's logic: the judges' words and levels, the check order.

The judges are pure functions of the facts; the sequence runs over a
recording stand-in for the network, so the order and the stop at the first
broken link are checked without sockets (the real network is in
tests/test_doctor_e2e.py).
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from threshold.ctl.doctor import (
    Gateway,
    Report,
    TunnelReport,
    check_tunnel,
    host_name,
    matches,
    render,
)
from threshold.ctl.doctor_facts import (
    EXIT_BROKEN,
    EXIT_WARNING,
    Answer,
    Check,
    Connect,
    Ending,
    Finding,
    Level,
    Probe,
    Resolution,
)
from threshold.ctl.doctor_words import (
    judge_answer,
    judge_certificate,
    judge_clients,
    judge_dns,
    judge_port,
)

NOW = datetime.datetime(2026, 1, 10, 12, 0, tzinfo=datetime.UTC)


def entry(**fields: Any) -> dict[str, Any]:
    """A GET /tunnels/status entry, healthy unless told otherwise."""
    base: dict[str, Any] = {
        "ClientIds": ["home-a"],
        "ListenAddress": "0.0.0.0",
        "ListenPort": 8080,
        "ListenHostnameGlob": "*",
        "BackEndService": "web",
        "HaProxyProxyProtocol": False,
        "Clients": [
            {"ClientId": "home-a", "Connected": True, "Healthy": True, "Reason": None}
        ],
        "Serving": ["home-a"],
    }
    base.update(fields)
    return base


def answer(ending: Ending, data: bytes = b"", probe: Probe = Probe.HTTP) -> Answer:
    return Answer(probe, ending, data, 0.2, None)


class DnsTests(SynchronousTestCase):
    def test_levels(self):
        """Ours only: ok; some elsewhere: warning; none ours or no answer: broken."""
        gateway = ("203.0.113.5",)
        cases = [
            (("203.0.113.5",), None, Level.OK),
            (("::ffff:203.0.113.5",), None, Level.OK),
            (("203.0.113.5", "198.51.100.1"), None, Level.WARNING),
            (("198.51.100.1",), None, Level.BROKEN),
            ((), "1.1.1.1:53 says: no such name (NXDOMAIN)", Level.BROKEN),
        ]
        for addresses, error, level in cases:
            found = judge_dns(
                Resolution("www.example.com", addresses, error, "1.1.1.1:53"), gateway
            )
            self.assertEqual((found.check, found.level), (Check.DNS, level), found)

    def test_words(self):
        """The message names the answer, the server asked and this gateway."""
        found = judge_dns(
            Resolution("www.example.com", ("198.51.100.1",), None, "1.1.1.1:53"),
            ("203.0.113.5",),
        )
        self.assertEqual(
            found.message,
            "www.example.com resolves to 198.51.100.1 (asked 1.1.1.1:53), which is"
            " not this gateway (its addresses: 203.0.113.5): users go elsewhere.",
        )
        self.assertIn("--public-address", found.fix)


class PortTests(SynchronousTestCase):
    def test_words(self):
        self.assertEqual(
            judge_port("::1", 443, Connect(True, None)).message,
            "[::1]:443 accepts connections.",
        )
        refused = judge_port("203.0.113.5", 443, Connect(False, "connection refused"))
        self.assertEqual(refused.level, Level.BROKEN)
        self.assertEqual(
            refused.message,
            "203.0.113.5:443 does not accept connections: connection refused.",
        )


class ClientTests(SynchronousTestCase):
    def test_none_connected(self):
        """Every client's state, the last error, and how to start it."""
        tunnel = entry(
            ClientIds=["home-a", "home-b"],
            Clients=[
                {"ClientId": "home-a", "Connected": False, "Healthy": False},
                {"ClientId": "home-b", "Connected": False, "Healthy": False},
            ],
            Serving=[],
        )
        clients = {
            "home-a": {
                "CurrentState": "ClientError",
                "LastChange": "2026-01-10T11:00:00Z",
                "LastError": "keepalive timeout",
            }
        }
        (found,) = judge_clients(tunnel, clients)
        self.assertEqual((found.check, found.level), (Check.CLIENT, Level.BROKEN))
        self.assertEqual(
            found.message,
            "No client of this tunnel is connected: home-a is not connected"
            " (ClientError since 2026-01-10T11:00:00Z, last error: keepalive"
            " timeout); home-b has never connected to this gateway.",
        )
        self.assertTrue(found.fix.startswith("Start threshold-client on home-a or"))

    def test_unhealthy_quoted(self):
        """The client's own words are quoted; no serving client is broken."""
        reason = "service web unhealthy: connection refused at 127.0.0.1:8080"
        tunnel = entry(
            Clients=[
                {
                    "ClientId": "home-a",
                    "Connected": True,
                    "Healthy": False,
                    "Reason": reason,
                }
            ],  # fmt: skip
            Serving=[],
        )
        client, service = judge_clients(tunnel, {})
        self.assertEqual(client.level, Level.OK)
        self.assertEqual((service.check, service.level), (Check.SERVICE, Level.BROKEN))
        self.assertEqual(
            service.message,
            'No client can serve web: home-a says "connection refused at'
            " 127.0.0.1:8080\" for web (the client's own words).",
        )

    def test_one_of_two_unhealthy_is_a_warning(self):
        reason = "service web unhealthy: timed out"
        tunnel = entry(
            ClientIds=["home-a", "home-b"],
            Clients=[
                {
                    "ClientId": "home-a",
                    "Connected": True,
                    "Healthy": False,
                    "Reason": reason,
                },
                {"ClientId": "home-b", "Connected": True, "Healthy": True},
            ],  # fmt: skip
            Serving=["home-b"],
        )
        _, service = judge_clients(tunnel, {})
        self.assertEqual(service.level, Level.WARNING)
        self.assertIn('home-b serves web, but home-a says "timed out"', service.message)

    def test_older_gateway_without_clients_in_status(self):
        """No Clients/Serving in the entry: the states come from GET /clients."""
        tunnel = entry()
        del tunnel["Clients"], tunnel["Serving"]
        up = {"home-a": {"CurrentState": "ClientConnected"}}
        self.assertEqual(
            [f.level for f in judge_clients(tunnel, up)], [Level.OK, Level.OK]
        )
        down = {"home-a": {"CurrentState": "ClientClosed"}}
        (found,) = judge_clients(tunnel, down)
        self.assertEqual((found.check, found.level), (Check.CLIENT, Level.BROKEN))

    def test_one_of_two_not_connected_is_a_warning(self):
        tunnel = entry(
            ClientIds=["home-a", "home-b"],
            Clients=[
                {"ClientId": "home-a", "Connected": True, "Healthy": True},
                {"ClientId": "home-b", "Connected": False, "Healthy": False},
            ],
        )
        client, service = judge_clients(tunnel, {"home-a": {"Health": {"web": {}}}})
        self.assertEqual(client.level, Level.WARNING)
        self.assertEqual(
            service.message, "home-a serves web: healthy on home-a (its HealthChecks)."
        )


class AnswerTests(SynchronousTestCase):
    """The PROXY-header heuristic, case by case (docs/doctor.md's table)."""

    def judge(self, proxy: bool, ans: Answer) -> Finding:
        return judge_answer(entry(HaProxyProxyProtocol=proxy), ans)

    def test_table(self):
        cases = [
            (False, answer(Ending.ANSWERED, b"HTTP/1.1 200 OK\r\n"), Level.OK),
            (False, answer(Ending.ANSWERED, b"SSH-2.0-OpenSSH_9.6\r\n"), Level.OK),
            (False, answer(Ending.ANSWERED, b"HTTP/1.1 400 Bad Request\r\n"),
             Level.BROKEN),
            (False, answer(Ending.CLOSED), Level.BROKEN),
            (True, answer(Ending.ANSWERED, b"HTTP/1.1 200 OK\r\n"), Level.OK),
            (True, answer(Ending.ANSWERED, b"HTTP/1.0 501 Not Implemented\r\n"),
             Level.BROKEN),
            (True, answer(Ending.ANSWERED, b"HTTP/1.1 405 Method Not Allowed\r\n"),
             Level.BROKEN),
            (True, answer(Ending.CLOSED), Level.WARNING),
            (True, answer(Ending.RESET), Level.BROKEN),
            (False, answer(Ending.SILENT), Level.SKIPPED),
            (False, answer(Ending.ANSWERED, b"\x16\x03\x03\x00\x7a", Probe.TLS),
             Level.OK),
            (True, answer(Ending.ANSWERED, b"\x15\x03\x03\x00\x02", Probe.TLS),
             Level.WARNING),
            (False, answer(Ending.ANSWERED, b"HTTP/1.1 200 OK\r\n", Probe.TLS),
             Level.WARNING),
        ]  # fmt: skip
        for proxy, ans, level in cases:
            found = self.judge(proxy, ans)
            self.assertEqual(
                (found.check, found.level), (Check.BACKEND, level), (proxy, ans, found)
            )
            if level >= Level.WARNING:
                self.assertTrue(found.fix, found)

    def test_connection_failed(self):
        failed = Answer(Probe.HTTP, Ending.RESET, b"", 0.0, "connection refused")
        found = self.judge(False, failed)
        self.assertEqual(
            (found.level, found.message),
            (
                Level.BROKEN,
                "A connection through the tunnel could not be made: connection"
                " refused.",
            ),
        )

    def test_words(self):
        self.assertEqual(
            self.judge(False, answer(Ending.CLOSED)).message,
            "web closed the connection without answering a HTTP HEAD request: it"
            " probably expects a PROXY header, which this tunnel does not send.",
        )
        self.assertEqual(
            self.judge(
                True, answer(Ending.ANSWERED, b"HTTP/1.1 400 Bad\x00\r\n")
            ).message,
            'web answered "HTTP/1.1 400 Bad." to the PROXY header: it does not'
            " expect one, and takes it for a bad request.",
        )
        self.assertEqual(
            self.judge(False, answer(Ending.RESET)).message,
            "A connection through the tunnel was reset before any answer: the client"
            " could not connect to web.",
        )


class CertificateTests(SynchronousTestCase):
    def test_levels_and_words(self):
        fix = "renew"
        later = judge_certificate(
            "X's certificate", NOW + datetime.timedelta(days=90), NOW, fix
        )
        self.assertEqual(later.level, Level.OK)
        self.assertEqual(
            later.message, "X's certificate is valid until 2026-04-10 12:00 UTC."
        )
        soon = judge_certificate(
            "X's certificate", NOW + datetime.timedelta(days=29, hours=23), NOW, fix
        )
        self.assertEqual(
            (soon.level, soon.message, soon.fix),
            (
                Level.WARNING,
                "X's certificate expires in 29 days, on 2026-02-09 11:00 UTC.",
                fix,
            ),
        )
        hours = judge_certificate(
            "X's certificate", NOW + datetime.timedelta(hours=3), NOW, fix
        )
        self.assertEqual(hours.level, Level.WARNING)
        self.assertIn("expires within a day", hours.message)
        gone = judge_certificate(
            "X's certificate", NOW - datetime.timedelta(days=1), NOW, fix
        )
        self.assertEqual(
            (gone.level, gone.message),
            (Level.BROKEN, "X's certificate expired on 2026-01-09 12:00 UTC."),
        )


class Recording:
    """The network as a list of what was asked, answering from fixed facts."""

    def __init__(self, resolution=None, connect=None, answer_=None) -> None:
        self.asked: list[tuple[Any, ...]] = []
        self.resolution = resolution
        self.connected = connect or Connect(True, None)
        self.answer = answer_ or answer(Ending.ANSWERED, b"HTTP/1.1 200 OK\r\n")

    async def resolve(self, name: str) -> Resolution:
        self.asked.append(("resolve", name))
        return self.resolution or Resolution(name, ("203.0.113.5",), None, None)

    async def connect(self, host: str, port: int) -> Connect:
        self.asked.append(("connect", host, port))
        return self.connected

    async def through(self, host: str, port: int, probe: Probe, name: str) -> Answer:
        self.asked.append(("through", host, port, probe, name))
        return self.answer


class SequenceTests(SynchronousTestCase):
    def walk(self, tunnel, probes, name=None, clients=None) -> TunnelReport:
        gateway = Gateway("https://gw:9057", ("203.0.113.5",), clients or {}, NOW, name)
        d = Deferred.fromCoroutine(check_tunnel(tunnel, gateway, probes))
        return self.successResultOf(d)

    def test_order_when_all_good(self):
        """DNS, port, client, service, backend, certificate, in that order."""
        probes = Recording()
        clients = {"home-a": {"CertificateNotAfter": "2027-01-01T00:00:00Z"}}
        report = self.walk(
            entry(ListenHostnameGlob="www.example.com", ListenPort=443),
            probes,
            clients=clients,
        )
        self.assertEqual(
            [f.check for f in report.findings],
            [Check.DNS, Check.PORT, Check.CLIENT, Check.SERVICE, Check.BACKEND,
             Check.CERTIFICATE],
        )  # fmt: skip
        self.assertEqual(
            probes.asked,
            [
                ("resolve", "www.example.com"),
                ("connect", "203.0.113.5", 443),
                ("through", "203.0.113.5", 443, Probe.TLS, "www.example.com"),
            ],
        )

    def test_stops_at_first_broken(self):
        """A name elsewhere: no connection is made at all."""
        probes = Recording(
            resolution=Resolution("www.example.com", ("198.51.100.1",), None, None)
        )
        report = self.walk(entry(ListenHostnameGlob="www.example.com"), probes)
        self.assertEqual([f.check for f in report.findings], [Check.DNS])
        self.assertEqual(report.level, Level.BROKEN)
        self.assertEqual(probes.asked, [("resolve", "www.example.com")])

    def test_port_refused_stops_before_clients(self):
        probes = Recording(connect=Connect(False, "connection refused"))
        report = self.walk(entry(), probes)
        self.assertEqual([f.check for f in report.findings], [Check.PORT])

    def test_plain_port_without_name(self):
        """No --name: no DNS check; the API host is where users connect."""
        probes = Recording()
        report = self.walk(entry(), probes)
        self.assertEqual(report.findings[0].check, Check.PORT)
        self.assertEqual(probes.asked[0], ("connect", "203.0.113.5", 8080))
        self.assertEqual(probes.asked[1][3], Probe.HTTP)

    def test_wildcard_without_name_is_skipped(self):
        report = self.walk(entry(ListenHostnameGlob="*.example.com"), Recording())
        self.assertEqual(
            (report.findings[0].check, report.findings[0].level),
            (Check.DNS, Level.SKIPPED),
        )
        self.assertEqual(report.level, Level.OK)

    def test_udp_tunnel_not_probed(self):
        probes = Recording()
        report = self.walk(entry(Protocol="udp"), probes)
        self.assertEqual(probes.asked, [])
        self.assertEqual(report.findings[-1].level, Level.SKIPPED)


class NamingTests(SynchronousTestCase):
    def test_host_name(self):
        self.assertEqual(host_name(entry(), None), (None, False))
        self.assertEqual(
            host_name(entry(), "app.example.com"), ("app.example.com", False)
        )
        exact = entry(ListenHostnameGlob="WWW.example.com")
        self.assertEqual(host_name(exact, "other"), ("www.example.com", True))
        wild = entry(ListenHostnameGlob="*.example.com")
        self.assertEqual(host_name(wild, "a.example.com"), ("a.example.com", True))
        self.assertEqual(host_name(wild, "a.example.org"), (None, True))

    def test_matches(self):
        tunnel = entry(ListenHostnameGlob="www.example.com", ListenPort=443)
        for wanted in ("443", "0.0.0.0:443", "www.example.com", "WWW.example.com:443"):
            self.assertTrue(matches(tunnel, wanted), wanted)
        for wanted in ("444", "example.com", "127.0.0.1:443"):
            self.assertFalse(matches(tunnel, wanted), wanted)


class ReportTests(SynchronousTestCase):
    def report(self, *levels: Level) -> Report:
        gateway = Gateway("https://gw:9057", ("203.0.113.5",), {}, NOW)
        tunnels = [
            TunnelReport(entry(), [Finding(Check.PORT, level, "m", "f")])
            for level in levels
        ]
        return Report(gateway, [Finding(Check.API, Level.SKIPPED, "x")], tunnels)

    def test_exit_statuses(self):
        """0 ok (skipped counts as ok), 4 warnings only, 5 anything broken."""
        self.assertEqual(self.report(Level.OK, Level.SKIPPED).exit_status, 0)
        self.assertEqual(self.report(Level.OK, Level.WARNING).exit_status, EXIT_WARNING)
        self.assertEqual(
            self.report(Level.WARNING, Level.BROKEN).exit_status, EXIT_BROKEN
        )
        self.assertEqual((EXIT_WARNING, EXIT_BROKEN), (4, 5))

    def test_render_fits_80_columns(self):
        """Long messages wrap under their column; the fix follows broken ones."""
        gateway = Gateway("https://gw:9057", ("203.0.113.5",), {}, NOW)
        long = Finding(Check.SERVICE, Level.BROKEN, "word " * 40, "do this " * 20)
        text = render(Report(gateway, [], [TunnelReport(entry(), [long])]))
        self.assertLessEqual(max(len(line) for line in text.splitlines()), 80)
        self.assertIn("  BROKEN   service      word word", text)
        self.assertIn("\n                        What to do: do this", text)
        self.assertTrue(text.endswith("1 broken, 0 with warnings, 0 good (exit 5)\n"))


class UsageTests(SynchronousTestCase):
    """Bad doctor options exit 2 before any connection is attempted."""

    def test_bad_options(self):
        from twisted.internet.testing import MemoryReactorClock

        from tests.test_ctl import call

        cases = [
            (["--public-address", "gateway.example"], "not an IP address"),
            (["--dns-server", "dns.example:53"], "expected HOST:PORT"),
            (["--dns-server", "1.1.1.1:99999"], "expected HOST:PORT"),
            (["--probe-timeout", "0"], "must be above 0"),
            (["--name", "two words"], "--name 'two words': not a host name"),
            (["--output", "yaml"], "invalid choice: 'yaml'"),
        ]
        for extra, fragment in cases:
            reactor = MemoryReactorClock()
            result = self.successResultOf(
                call(reactor, ["--server", "http://h:1", "doctor", *extra])
            )
            self.assertEqual(result.status, 2, (extra, result))
            self.assertIn(fragment, result.err, extra)
            self.assertEqual(result.out, "")
            self.assertEqual(reactor.tcpClients, [], extra)

    def test_dns_server_forms(self):
        from threshold.ctl.doctor_cli import _dns_server

        self.assertEqual(_dns_server("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(_dns_server("9.9.9.9"), ("9.9.9.9", 53))
        self.assertEqual(_dns_server("[::1]:5353"), ("::1", 5353))
        self.assertEqual(_dns_server("::1"), ("::1", 53))
