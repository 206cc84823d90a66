"""threshold-ctl doctor on a real deployment on loopback, each link broken on purpose.

A twisted.names DNS server on loopback answers the names; the backends are
real HTTP servers (one behind Twisted's PROXY-protocol wrapper); the client
is a real threshold-client with HealthChecks where the test needs its words.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.certs import test_pki
from tests.doctorkit import DnsServer, http_backend, tls_backend
from tests.support import Backend, Deployment, free_port, tunnel, wait_until
from tests.test_ctl import call
from threshold.config.client import HealthCheck
from threshold.ctl import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from threshold.ctl.doctor_facts import EXIT_BROKEN, EXIT_WARNING
from threshold.keygen import KeyPair, make_client_cert, make_server_cert, write_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = "TestClient1"


class DoctorDeploymentTests(TestCase):
    """One gateway, one client, one tunnel; each test breaks one link."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(False, self.mktemp())
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.dns = DnsServer({"app.test": ["127.0.0.1"]})
        self.dns_server = self.dns.start()
        self.addCleanup(self.dns.stop)
        self.port = free_port()
        yield None

    @inlineCallbacks
    def backend(self, expects_proxy: bool = False):
        port = yield http_backend(expects_proxy)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def serve(self, service_port: int, proxy: bool = False, health: bool = False):
        """Start the client (web -> service_port) and put the tunnel."""
        fields = {}
        if health:
            fields["health_checks"] = {
                "web": HealthCheck(interval_seconds=1, timeout_seconds=1)
            }
        self.deployment.start_client(
            CLIENT, {"web": ("127.0.0.1", service_port)}, **fields
        )
        yield self.deployment.wait_connected(CLIENT)
        code, body = yield self.deployment.put_tunnels(
            [tunnel(CLIENT, self.port, "web", proxy=proxy)]
        )
        self.assertEqual(code, 200, body)

    def doctor(self, *argv: str):
        url = f"http://127.0.0.1:{self.deployment.management_port}"
        return call(
            reactor,
            ["--server", url, "doctor", "--dns-server", self.dns_server,
             "--probe-timeout", "2", *argv],
        )  # fmt: skip

    def assertLine(self, out: str, *fragments: str) -> None:
        """Some finding (its wrapped lines joined) holds every fragment."""
        text = " ".join(out.split())
        for fragment in fragments:
            self.assertIn(fragment, text, out)

    @inlineCallbacks
    def test_all_good(self):
        """Name, port, client, service and backend fine: exit 0, every check ok."""
        yield self.serve((yield self.backend()))
        result = yield self.doctor("--name", "app.test")
        self.assertEqual(result.status, EXIT_OK, result)
        self.assertEqual(result.err, "")
        for check in ("dns", "port", "client", "service", "backend"):
            self.assertRegex(result.out, rf"\n  ok +{check} ")
        self.assertLine(
            result.out,
            f"app.test resolves to 127.0.0.1 (asked {self.dns_server}), this gateway.",
            f"127.0.0.1:{self.port} accepts connections.",
            'web answered "HTTP/1.1 200 OK"; no PROXY header is sent, none seems',
            "result: all good: 1 tunnel, 0 broken, 0 with warnings, 1 good (exit 0)",
        )
        self.assertNotIn("WARNING", result.out)
        self.assertNotIn("BROKEN", result.out)

    @inlineCallbacks
    def test_json_output(self):
        """--output json: the documented structure, the same levels."""
        yield self.serve((yield self.backend()))
        result = yield self.doctor("--output", "json", "--name", "app.test")
        self.assertEqual(result.status, EXIT_OK, result)
        report = json.loads(result.out)
        self.assertEqual((report["Level"], report["ExitStatus"]), ("ok", 0))
        (one,) = report["Tunnels"]
        self.assertEqual(one["Tunnel"], f"127.0.0.1:{self.port}")
        self.assertEqual(
            [f["Check"] for f in one["Findings"]],
            ["dns", "port", "client", "service", "backend"],
        )
        self.assertEqual({f["Level"] for f in one["Findings"]}, {"ok"})
        self.assertEqual(report["Gateway"]["Findings"][0]["Check"], "api")

    @inlineCallbacks
    def test_name_resolves_elsewhere(self):
        """A name whose A record is another address: broken at dns, nothing after."""
        self.dns.records["app.test"] = ["192.0.2.7"]
        yield self.serve((yield self.backend()))
        result = yield self.doctor("--name", "app.test")
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(
            result.out,
            "BROKEN dns app.test resolves to 192.0.2.7",
            "which is not this gateway (its addresses: 127.0.0.1): users go elsewhere.",
            "What to do: Point the A/AAAA records of app.test at 127.0.0.1",
        )
        self.assertNotRegex(result.out, r"\n  \S+ +port ")

    @inlineCallbacks
    def test_name_does_not_resolve(self):
        """NXDOMAIN from the DNS server is said in its words."""
        yield self.serve((yield self.backend()))
        result = yield self.doctor("--name", "nowhere.test")
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(
            result.out,
            f"nowhere.test does not resolve: {self.dns_server} says: no such name"
            " (NXDOMAIN).",
        )

    @inlineCallbacks
    def test_port_does_not_accept(self):
        """The name points at an address of the gateway where the port is closed."""
        self.dns.records["app.test"] = ["127.0.0.2"]
        yield self.serve((yield self.backend()))
        result = yield self.doctor(
            "--name", "app.test", "--public-address", "127.0.0.2"
        )
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(
            result.out,
            "ok dns app.test resolves to 127.0.0.2",
            f"BROKEN port 127.0.0.2:{self.port} does not accept connections:"
            " connection refused.",
            "open the port in the firewall",
        )
        self.assertNotRegex(result.out, r"\n  \S+ +client ")

    @inlineCallbacks
    def test_no_client_connected(self):
        """A tunnel of a client that never connected: broken at client."""
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient2", self.port, "web")]
        )
        self.assertEqual(code, 200, body)
        result = yield self.doctor()
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(
            result.out,
            f"ok port 127.0.0.1:{self.port} accepts connections.",
            "BROKEN client No client of this tunnel is connected: TestClient2 has"
            " never connected to this gateway.",
            "What to do: Start threshold-client on TestClient2",
        )

    @inlineCallbacks
    def test_client_gone(self):
        """A client that was connected and stopped: its state is said."""
        yield self.serve((yield self.backend()))
        yield self.deployment.stop_client(CLIENT)
        yield wait_until(
            lambda: not self.deployment.server.registry.is_connected(CLIENT)
        )
        result = yield self.doctor(str(self.port))
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(result.out, "TestClient1 is not connected (ClientClosed since")

    @inlineCallbacks
    def test_service_down_in_the_clients_words(self):
        """HealthChecks report connection refused: quoted, broken at service."""
        down = free_port()
        yield self.serve(down, health=True)
        registry = self.deployment.server.registry
        yield wait_until(
            lambda: registry.record(CLIENT).health.get("web") is False,
            what="the unhealthy report",
        )
        result = yield self.doctor()
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(
            result.out,
            f'BROKEN service No client can serve web: TestClient1 says "connection'
            f" refused at 127.0.0.1:{down}\" for web (the client's own words).",
            "What to do: Start the service web",
        )

    @inlineCallbacks
    def test_service_down_without_health_checks(self):
        """No HealthChecks: the reset through the tunnel tells the service is down."""
        yield self.serve(free_port())
        result = yield self.doctor()
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(
            result.out,
            "not checked by the client (no HealthChecks entry)",
            "BROKEN backend A connection through the tunnel was reset before any"
            " answer: the client could not connect to web.",
        )

    @inlineCallbacks
    def test_backend_expects_proxy_not_sent(self):
        """A backend behind a PROXY-protocol wrapper closes plain requests."""
        yield self.serve((yield self.backend(expects_proxy=True)), proxy=False)
        result = yield self.doctor()
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(
            result.out,
            "BROKEN backend web closed the connection without answering a HTTP HEAD"
            " request: it probably expects a PROXY header, which this tunnel does"
            " not send.",
            "What to do: Set HaProxyProxyProtocol true",
        )

    @inlineCallbacks
    def test_backend_expects_proxy_and_gets_it(self):
        """The same backend with the header sent: ok."""
        yield self.serve((yield self.backend(expects_proxy=True)), proxy=True)
        result = yield self.doctor()
        self.assertEqual(result.status, EXIT_OK, result)
        self.assertLine(
            result.out,
            'ok backend web answered "HTTP/1.1 200 OK"; the PROXY header it gets is'
            " accepted.",
        )

    @inlineCallbacks
    def test_proxy_sent_not_expected(self):
        """A plain HTTP backend answers 400 to the PROXY line."""
        yield self.serve((yield self.backend()), proxy=True)
        result = yield self.doctor()
        self.assertEqual(result.status, EXIT_BROKEN, result)
        self.assertLine(
            result.out,
            'BROKEN backend web answered "HTTP/1.1 400 Bad Request" to the PROXY'
            " header: it does not expect one",
            "What to do: Set HaProxyProxyProtocol false",
        )

    @inlineCallbacks
    def sni_tunnel(self, proxy: bool):
        """An HTTPS backend behind a tunnel routed by the name app.test."""
        pki = test_pki()
        port = yield tls_backend(pki.server_cert, pki.server_key)
        self.addCleanup(port.stopListening)
        self.deployment.start_client(
            CLIENT, {"web": ("127.0.0.1", port.getHost().port)}
        )
        yield self.deployment.wait_connected(CLIENT)
        code, body = yield self.deployment.put_tunnels(
            [
                tunnel(
                    CLIENT, self.port, "web", proxy=proxy, ListenHostnameGlob="app.test"
                )
            ]
        )
        self.assertEqual(code, 200, body)

    @inlineCallbacks
    def test_sni_tunnel_all_good(self):
        """A hostname tunnel: its own name is resolved, a ClientHello is answered."""
        yield self.sni_tunnel(proxy=False)
        result = yield self.doctor()
        self.assertEqual(result.status, EXIT_OK, result)
        self.assertLine(
            result.out,
            f"tunnel 127.0.0.1:{self.port} app.test (service web, TestClient1)",
            "ok dns app.test resolves to 127.0.0.1",
            "ok backend web answered the TLS ClientHello with a handshake; no PROXY"
            " header is sent, none seems expected.",
        )

    @inlineCallbacks
    def test_sni_tunnel_proxy_not_expected(self):
        """A TLS service that gets a PROXY header it does not expect: not ok."""
        yield self.sni_tunnel(proxy=True)
        result = yield self.doctor("app.test")
        self.assertEqual(result.status, EXIT_WARNING, result)
        self.assertLine(
            result.out,
            "WARNING backend web closed the connection without answering the PROXY"
            " header and a TLS ClientHello: it may not expect a PROXY header.",
            "What to do: Set HaProxyProxyProtocol false",
        )

    @inlineCallbacks
    def test_service_that_says_nothing(self):
        """A service that neither speaks first nor answers: cannot tell, exit 0."""
        silent = Backend(echo=False)
        yield self.serve((yield silent.start()))
        self.addCleanup(silent.stop)
        result = yield self.doctor("--probe-timeout", "0.5")
        self.assertEqual(result.status, EXIT_OK, result)
        self.assertLine(
            result.out,
            "skipped backend web did not answer a HTTP HEAD request within",
            "whether it expects a PROXY header cannot be told.",
        )
        # The port check's connection (closed at once, if it got this far)
        # sends nothing; the probe's sends the request.
        (connection,) = [c for c in silent.connections if c.data]
        self.assertTrue(
            connection.data.startswith(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1")
        )

    @inlineCallbacks
    def test_one_tunnel_named(self):
        """TUNNEL walks only that one; one that is not in force is a usage error."""
        yield self.serve((yield self.backend()))
        result = yield self.doctor(f"127.0.0.1:{self.port}")
        self.assertEqual(result.status, EXIT_OK, result)
        self.assertEqual(result.out.count("\ntunnel "), 1)
        missing = yield self.doctor("1")
        self.assertEqual(missing.status, EXIT_USAGE, missing)
        self.assertEqual(
            missing.err,
            "threshold-ctl: error: no tunnel in force matches '1' (the tunnels:"
            f" 127.0.0.1:{self.port})\n",
        )

    @inlineCallbacks
    def test_no_certificates_without_tls(self):
        """A gateway without TLS has no certificate: skipped, not failed."""
        yield self.serve((yield self.backend()))
        result = yield self.doctor()
        self.assertEqual(result.status, EXIT_OK, result)
        self.assertLine(
            result.out,
            "skipped certificate The gateway reports no certificate (it runs"
            " without TLS).",
        )
        self.assertNotRegex(result.out, r"\n  \S+ +certificate +TestClient1")


class DoctorCertificateTests(TestCase):
    """Certificates expiring soon (made with a short validity): warnings, exit 4."""

    timeout = 60

    def short_lived(self, pair: Any) -> tuple[str, str]:
        directory = self.mktemp()
        os.mkdir(directory)
        cert, key = os.path.join(directory, "c.crt"), os.path.join(directory, "c.key")
        write_pair(pair, cert, key)
        return cert, key

    @inlineCallbacks
    def test_certificates_expiring(self):
        """The gateway's in 10 days, the client's in 5: both said, with the fix."""
        pki = test_pki()
        with open(pki.ca_cert, "rb") as c, open(pki.ca_key, "rb") as k:
            ca = KeyPair(c.read(), k.read())
        server_cert, server_key = self.short_lived(
            make_server_cert(ca, ["localhost"], ["127.0.0.1"], days=10)
        )
        client_cert, client_key = self.short_lived(make_client_cert(ca, CLIENT, days=5))
        deployment = Deployment(
            True,
            self.mktemp(),
            server_tls_certificate_file=server_cert,
            server_tls_key_file=server_key,
        )
        self.addCleanup(deployment.stop)
        deployment.start_server()
        backend = yield http_backend()
        self.addCleanup(backend.stopListening)
        deployment.start_client(
            CLIENT,
            {"web": ("127.0.0.1", backend.getHost().port)},
            client_tls_certificate_file=client_cert,
            client_tls_key_file=client_key,
        )
        yield deployment.wait_connected(CLIENT)
        code, body = yield deployment.put_tunnels([tunnel(CLIENT, free_port(), "web")])
        self.assertEqual(code, 200, body)
        result = yield call(
            reactor,
            [
                "--server", f"https://localhost:{deployment.management_port}",
                "--ca", pki.ca_cert,
                "--cert", pki.client_cert("operator"),
                "--key", pki.client_key("operator"),
                "doctor",
            ],
        )  # fmt: skip
        self.assertEqual(result.status, EXIT_WARNING, result)
        text = " ".join(result.out.split())
        self.assertRegex(
            text,
            r"WARNING certificate The gateway's certificate expires in"
            r" (9|10) days",
        )
        self.assertIn("What to do: Make a new server certificate", text)
        self.assertRegex(
            text, r"WARNING certificate TestClient1's certificate expires in (4|5) days"
        )
        self.assertIn(
            "What to do: Make a new certificate (threshold-keygen client --ca-dir pki"
            " --out pki TestClient1)",
            text,
        )
        self.assertIn("ok backend", text)
        self.assertIn("result: warning: 1 tunnel, 0 broken, 1 with warnings", text)


class DoctorProcessTests(TestCase):
    """The real threshold-ctl process: doctor's exit statuses."""

    timeout = 60

    def spawn(self, *argv: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("THRESHOLD_")}
        env["PYTHONPATH"] = ROOT
        return getProcessOutputAndValue(
            sys.executable, ["-m", "threshold.ctl", *argv], env=env, path=ROOT
        )

    @inlineCallbacks
    def test_exit_statuses(self):
        """0 all good, 5 broken, 3 gateway unreachable, 2 bad option."""
        deployment = Deployment(False, self.mktemp())
        self.addCleanup(deployment.stop)
        deployment.start_server()
        backend = yield http_backend()
        self.addCleanup(backend.stopListening)
        deployment.start_client(CLIENT, {"web": ("127.0.0.1", backend.getHost().port)})
        yield deployment.wait_connected(CLIENT)
        good, bad = free_port(), free_port()
        code, body = yield deployment.put_tunnels(
            [tunnel(CLIENT, good, "web"), tunnel("TestClient2", bad, "web")]
        )
        self.assertEqual(code, 200, body)
        url = f"http://127.0.0.1:{deployment.management_port}"
        out, err, status = yield self.spawn("--server", url, "doctor", str(good))
        self.assertEqual((status, err), (EXIT_OK, b""), out)
        self.assertIn(b"result: all good", out)
        out, err, status = yield self.spawn("--server", url, "doctor")
        self.assertEqual((status, err), (EXIT_BROKEN, b""), out)
        self.assertIn(b"1 broken", out)
        out, err, status = yield self.spawn(
            "--server", f"http://127.0.0.1:{free_port()}", "doctor"
        )
        self.assertEqual(status, EXIT_UNREACHABLE, err)
        self.assertIn(b"connection refused", err)
        out, err, status = yield self.spawn(
            "--server", url, "doctor", "--dns-server", "dns.example:53"
        )
        self.assertEqual(status, EXIT_USAGE, err)
        self.assertIn(b"--dns-server", err)


class _OlderGateway(Resource):
    """The API of a gateway from before GET /server and CertificateNotAfter."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/clients":
            return json.dumps({CLIENT: {"CurrentState": "ClientClosed"}}).encode()
        if request.path == b"/tunnels/status":
            return json.dumps({"Tunnels": [], "NotRestored": []}).encode()
        request.setResponseCode(404)
        return b'{"error": "not found"}'


class OlderGatewayTests(TestCase):
    """A gateway that does not report certificates: doctor says it cannot check."""

    timeout = 30

    @inlineCallbacks
    def test_cannot_check_certificates(self):
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(_OlderGateway())
        )
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        result = yield call(reactor, ["--server", url, "doctor"])
        self.assertEqual(result.status, EXIT_OK, result)
        text = " ".join(result.out.split())
        self.assertIn(
            "skipped certificate Cannot check the gateway's certificate: GET /server"
            " answers 404 Not Found: not found (an older gateway?), and the API is"
            " plain http.",
            text,
        )
        self.assertIn(
            "skipped certificate Cannot check the clients' certificates: this"
            " gateway's GET /clients does not report CertificateNotAfter",
            text,
        )
        self.assertIn("result: all good: 0 tunnels", text)
