"""Tests for threshold.ctl: threshold-ctl against a real server on loopback."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.certs import test_pki
from tests.components import missing
from tests.support import Deployment, free_port, tunnel
from threshold.ctl import (
    EXIT_API_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    run,
)
from threshold.server.tunnels import parse_tunnels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normalised(entry: dict[str, Any]) -> dict[str, Any]:
    """A tunnel as the API answers it: every field, defaults included."""
    return parse_tunnels([entry])[0].to_json()


def ipv6_loopback() -> bool:
    """Whether this host can listen on ::1."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class Result:
    """What one threshold-ctl run printed and returned."""

    def __init__(self, status: int, out: str, err: str) -> None:
        self.status = status
        self.out = out
        self.err = err

    def __repr__(self) -> str:
        return f"Result({self.status}, out={self.out!r}, err={self.err!r})"


def call(
    the_reactor: Any,
    argv: list[str],
    stdin: bytes = b"",
    environ: dict[str, str] | None = None,
):
    """Run threshold-ctl in-process; return a Deferred firing with a Result."""
    out, err = io.StringIO(), io.StringIO()
    d = run(
        the_reactor,
        argv,
        stdin=io.BytesIO(stdin),
        stdout=out,
        stderr=err,
        environ=environ or {},
    )
    return d.addCallback(lambda status: Result(status, out.getvalue(), err.getvalue()))


class _DeploymentMixin:
    """Tests that run with and without TLS against a real server."""

    use_tls: bool
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self.use_tls, self.mktemp())
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        yield deferLater(reactor, 0, lambda: None)

    def server_args(self, cert_name: str = "operator") -> list[str]:
        scheme = "https" if self.use_tls else "http"
        args = ["--server", f"{scheme}://127.0.0.1:{self.deployment.management_port}"]
        pki = self.deployment.pki
        if pki is not None:
            args += [
                "--ca",
                pki.ca_cert,
                "--cert",
                pki.client_cert(cert_name),
                "--key",
                pki.client_key(cert_name),
            ]
        return args

    def ctl(self, *argv: str, stdin: bytes = b"", cert_name: str = "operator"):
        return call(reactor, [*self.server_args(cert_name), *argv], stdin)

    def write(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    @inlineCallbacks
    def test_ping(self):
        """ping prints pong and exits 0."""
        result = yield self.ctl("ping")
        self.assertEqual((result.status, result.out, result.err), (0, "pong\n", ""))

    @inlineCallbacks
    def test_clients(self):
        """clients prints the server's client states as pretty JSON."""
        self.deployment.start_client("TestClient1", {})
        yield self.deployment.wait_connected("TestClient1")
        result = yield self.ctl("clients")
        self.assertEqual((result.status, result.err), (EXIT_OK, ""))
        clients = json.loads(result.out)
        self.assertEqual(clients["TestClient1"]["CurrentState"], "ClientConnected")
        self.assertEqual(set(clients), {"TestClient1"})
        self.assertGreater(len(result.out.splitlines()), 1)

    @inlineCallbacks
    def test_tunnels_put_get_round_trip(self):
        """tunnels put applies a FILE and prints the set; tunnels get shows it."""
        self.deployment.start_client("TestClient1", {})
        yield self.deployment.wait_connected("TestClient1")
        entries = [
            tunnel("TestClient1", free_port(), "web", proxy=True),
            {"ClientIdentifier": "TestClient1", "ListenPort": free_port(),
             "ListenAddress": "127.0.0.1", "BackEndService": "ssh"},
        ]  # fmt: skip
        expected = [normalised(e) for e in entries]
        path = self.write(json.dumps(entries).encode())

        put = yield self.ctl("tunnels", "put", path)
        self.assertEqual((put.status, put.err), (EXIT_OK, ""))
        self.assertEqual(json.loads(put.out), expected)
        self.assertEqual(
            [t.to_json() for t in self.deployment.server.routes.tunnels()], expected
        )

        got = yield self.ctl("tunnels", "get", "--compact")
        self.assertEqual((got.status, got.err), (EXIT_OK, ""))
        self.assertEqual(json.loads(got.out), expected)
        self.assertEqual(got.out.count("\n"), 1)

    @inlineCallbacks
    def test_tunnels_put_stdin(self):
        """tunnels put - reads the list from stdin; [] removes every tunnel."""
        self.deployment.start_client("TestClient1", {})
        yield self.deployment.wait_connected("TestClient1")
        entries = [tunnel("TestClient1", free_port(), "web")]
        put = yield self.ctl("tunnels", "put", "-", stdin=json.dumps(entries).encode())
        self.assertEqual(
            (put.status, json.loads(put.out)), (0, [normalised(entries[0])])
        )
        empty = yield self.ctl("tunnels", "put", "-", stdin=b"[]")
        self.assertEqual((empty.status, json.loads(empty.out)), (0, []))
        self.assertEqual(self.deployment.server.routes.tunnels(), [])

    @inlineCallbacks
    def test_client_listed_twice(self):
        """A 400 for a client listed twice exits 1 with its message."""
        entry = tunnel("TestClient9", 9000, "web")
        del entry["ClientId"]
        entry["ClientIds"] = ["TestClient9", "TestClient9"]
        path = self.write(json.dumps([entry]).encode())
        result = yield self.ctl("tunnels", "put", path)
        self.assertEqual(result.status, EXIT_API_ERROR)
        self.assertEqual(result.out, "")
        self.assertEqual(
            result.err,
            'threshold-ctl: 400 Bad Request: entry 0: field "ClientIds[1]":'
            ' "TestClient9" is listed twice (entries 0 and 1) (entry 0, field'
            " ClientIds[1])\n",
        )

    @inlineCallbacks
    def test_address_in_use(self):
        """A 409 names the entry and field, and the previous set stays."""
        self.deployment.start_client("TestClient1", {})
        yield self.deployment.wait_connected("TestClient1")
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = self.write(json.dumps([tunnel("TestClient1", port, "web")]).encode())
        result = yield self.ctl("tunnels", "put", path)
        self.assertEqual(result.status, EXIT_API_ERROR)
        self.assertEqual(
            result.err,
            f"threshold-ctl: 409 Conflict: entry 0: address 127.0.0.1:{port} already"
            " in use (entry 0, field ListenPort)\n",
        )

    @inlineCallbacks
    def test_invalid_entry(self):
        """The server's 400 for an invalid field is printed and exits 1."""
        path = self.write(
            b'[{"ClientId": "TestClient1", "ListenPort": 0, "BackEndService": "w"}]'
        )
        result = yield self.ctl("tunnels", "put", path)
        self.assertEqual(result.status, EXIT_API_ERROR)
        self.assertTrue(result.err.startswith("threshold-ctl: 400 Bad Request: "))
        self.assertTrue(result.err.endswith("(entry 0, field ListenPort)\n"), result)

    @inlineCallbacks
    def test_ipv6_literal(self):
        """An IPv6 literal in --server ([::1]) reaches a server listening there."""
        if not ipv6_loopback():
            raise missing("no IPv6 loopback here")
        deployment = Deployment(
            self.use_tls, self.mktemp(), management_listen_address="::1"
        )
        self.addCleanup(deployment.stop)
        deployment.start_server()
        args = self.server_args()
        args[1] = (
            args[1]
            .replace("127.0.0.1", "[::1]")
            .replace(
                str(self.deployment.management_port), str(deployment.management_port)
            )
        )
        result = yield call(reactor, [*args, "ping"])
        self.assertEqual((result.status, result.out), (EXIT_OK, "pong\n"), result)

    @inlineCallbacks
    def test_options_after_command_and_environment(self):
        """Global options work after the command, and from THRESHOLD_*."""
        args = self.server_args()
        environ = {}
        for option, name in (
            ("--server", "THRESHOLD_SERVER"),
            ("--ca", "THRESHOLD_CA"),
            ("--cert", "THRESHOLD_CERT"),
            ("--key", "THRESHOLD_KEY"),
        ):
            if option in args:
                environ[name] = args[args.index(option) + 1]
        from_env = yield call(reactor, ["tunnels", "get", "--compact"], b"", environ)
        self.assertEqual((from_env.status, from_env.out), (0, "[]\n"), from_env)
        after = yield call(reactor, ["ping", *args])
        self.assertEqual((after.status, after.out), (0, "pong\n"), after)


class PlainDeploymentTests(_DeploymentMixin, TestCase):
    """threshold-ctl against a server with UseTls false."""

    use_tls = False

    @inlineCallbacks
    def test_http_against_tls_hint(self):
        """A plain http:// server that is not HTTP at all is unreachable (3)."""
        port = yield self.silent_listener(close=True)
        result = yield call(reactor, ["--server", f"http://127.0.0.1:{port}", "ping"])
        self.assertEqual(result.status, EXIT_UNREACHABLE, result)
        self.assertIn("closed before an answer", result.err)
        self.assertIn("https://", result.err)

    @inlineCallbacks
    def test_timeout(self):
        """A server that never answers is unreachable (3) after --timeout."""
        port = yield self.silent_listener(close=False)
        result = yield call(
            reactor,
            ["--server", f"http://127.0.0.1:{port}", "--timeout", "0.2", "ping"],
        )
        self.assertEqual(result.status, EXIT_UNREACHABLE, result)
        self.assertEqual(
            result.err,
            f"threshold-ctl: cannot reach http://127.0.0.1:{port}: no answer within"
            " 0.2 seconds\n",
        )

    @inlineCallbacks
    def test_connection_refused(self):
        """A port where nothing listens is unreachable (3)."""
        port = free_port()
        result = yield call(reactor, ["--server", f"http://127.0.0.1:{port}", "ping"])
        self.assertEqual(result.status, EXIT_UNREACHABLE)
        self.assertEqual(
            result.err,
            f"threshold-ctl: cannot reach http://127.0.0.1:{port}:"
            " connection refused\n",
        )

    @inlineCallbacks
    def test_not_the_api(self):
        """A server that is not the API: its error page or non-JSON is exit 1."""

        class Page(Resource):
            isLeaf = True

            def render_GET(self, request) -> bytes:
                if request.path == b"/clients":
                    request.setResponseCode(502)
                return b"<html>\n<body>Bad   gateway</body>\n</html>"

        site_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(Page())
        )
        self.addCleanup(site_port.stopListening)
        url = f"http://127.0.0.1:{site_port.getHost().port}"
        error = yield call(reactor, ["--server", url, "clients"])
        self.assertEqual(error.status, EXIT_API_ERROR)
        self.assertEqual(
            error.err,
            "threshold-ctl: 502 Bad Gateway: <html> <body>Bad gateway</body> </html>\n",
        )
        not_json = yield call(reactor, ["--server", url, "tunnels", "get"])
        self.assertEqual(not_json.status, EXIT_API_ERROR)
        self.assertTrue(not_json.err.startswith("threshold-ctl: 200 OK: the answer"))
        self.assertIn("is --server the API?", not_json.err)

    @inlineCallbacks
    def silent_listener(self, close: bool):
        """Listen on loopback; each connection says nothing (and closes if asked)."""

        class Silent(Protocol):
            def connectionMade(self) -> None:
                if close:
                    self.transport.loseConnection()

        wrapper = WrappingFactory(Factory.forProtocol(Silent))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            wrapper
        )

        @inlineCallbacks
        def stop():
            yield port.stopListening()
            for _ in range(100):
                if not wrapper.protocols:
                    return
                yield deferLater(reactor, 0.01, lambda: None)

        self.addCleanup(stop)
        return port.getHost().port


class TlsDeploymentTests(_DeploymentMixin, TestCase):
    """threshold-ctl against a server with mutual TLS."""

    use_tls = True

    @inlineCallbacks
    def test_other_ca_unreachable(self):
        """A --ca that did not sign the server's certificate is a TLS failure (3)."""
        args = self.server_args()
        args[args.index("--ca") + 1] = self.deployment.pki.other_ca_cert
        result = yield call(reactor, [*args, "ping"])
        self.assertEqual(result.status, EXIT_UNREACHABLE, result)
        self.assertIn("TLS failure", result.err)
        self.assertEqual(result.err.count("\n"), 1)

    @inlineCallbacks
    def test_client_certificate_from_other_ca(self):
        """A --cert the server's CA did not sign is refused in TLS (3)."""
        pki = self.deployment.pki
        args = self.server_args()
        args[args.index("--cert") + 1] = pki.other_client_cert
        args[args.index("--key") + 1] = pki.other_client_key
        result = yield call(reactor, [*args, "ping"])
        self.assertEqual(result.status, EXIT_UNREACHABLE, result)
        self.assertIn("TLS failure", result.err)
        self.assertEqual(result.out, "")

    @inlineCallbacks
    def test_http_against_tls_server(self):
        """http:// against the TLS API gets no answer (3) and a hint."""
        port = self.deployment.management_port
        result = yield call(reactor, ["--server", f"http://127.0.0.1:{port}", "ping"])
        self.assertEqual(result.status, EXIT_UNREACHABLE, result)
        self.assertIn("use an https:// URL", result.err)


class ForbiddenCertificateTests(TestCase):
    """A certificate the API does not allow gets the 403 message, exit 1."""

    timeout = 30

    @inlineCallbacks
    def test_tunnel_client_certificate_forbidden(self):
        """TestClient1's certificate with ManagementAllowedCommonNames operator."""
        deployment = Deployment(
            True, self.mktemp(), management_allowed_common_names=("operator",)
        )
        self.addCleanup(deployment.stop)
        deployment.start_server()
        pki = deployment.pki
        base = [
            "--server",
            f"https://localhost:{deployment.management_port}",
            "--ca",
            pki.ca_cert,
        ]
        result = yield call(
            reactor,
            [
                *base,
                "--cert",
                pki.client_cert("TestClient1"),
                "--key",
                pki.client_key("TestClient1"),
                "clients",
            ],
        )
        self.assertEqual(result.status, EXIT_API_ERROR)
        self.assertEqual(
            result.err,
            'threshold-ctl: 403 Forbidden: certificate CN "TestClient1" may not use'
            " the management API\n",
        )
        allowed = yield call(
            reactor,
            [
                *base,
                "--cert",
                pki.client_cert("operator"),
                "--key",
                pki.client_key("operator"),
                "clients",
            ],
        )
        self.assertEqual((allowed.status, json.loads(allowed.out)), (0, {}))


class UsageTests(SynchronousTestCase):
    """Usage errors exit 2 before any connection is attempted."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pki = test_pki()

    def ctl(self, *argv: str, stdin: bytes = b"", environ=None) -> Result:
        result = self.successResultOf(call(self.reactor, list(argv), stdin, environ))
        self.assertEqual(self.reactor.tcpClients, [], "a connection was attempted")
        return result

    def assertUsage(self, result: Result, *fragments: str) -> None:
        self.assertEqual(result.status, EXIT_USAGE, result)
        self.assertEqual(result.out, "")
        self.assertTrue(result.err.startswith("threshold-ctl: error: "), result.err)
        self.assertEqual(result.err.count("\n"), 1, result.err)
        for fragment in fragments:
            self.assertIn(fragment, result.err)

    def tls(self, **override: str) -> list[str]:
        files = {
            "ca": self.pki.ca_cert,
            "cert": self.pki.client_cert("operator"),
            "key": self.pki.client_key("operator"),
        }
        files.update(override)
        args = ["--server", "https://localhost:9057"]
        for name, path in files.items():
            args += [f"--{name}", path]
        return args

    def write(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_no_server(self):
        """Without --server or THRESHOLD_SERVER the error says how to give one."""
        self.assertUsage(self.ctl("ping"), "--server", "THRESHOLD_SERVER")

    def test_bad_server_urls(self):
        """A URL that is not http(s)://host[:port][/path] is refused, named."""
        for url in (
            "tunnel.example.net:9057",
            "ftp://tunnel.example.net",
            "https://tunnel.example.net:99999",
            "https://",
            "https://user@tunnel.example.net",
            "https://tunnel.example.net/?x=1",
        ):
            self.assertUsage(self.ctl("--server", url, "ping"), repr(url))

    def test_https_needs_files(self):
        """https:// without --ca, --cert and --key names what is missing."""
        result = self.ctl("--server", "https://h:1", "--cert", "c.crt", "ping")
        self.assertUsage(result, "missing --ca, --key", "THRESHOLD_CA, THRESHOLD_KEY")

    def test_unreadable_certificate_files(self):
        """A certificate file that cannot be read is named with its option."""
        missing = os.path.join(self.mktemp(), "nope.crt")
        self.assertUsage(self.ctl(*self.tls(cert=missing), "ping"), f"--cert {missing}")
        garbage = self.write(b"not a key")
        self.assertUsage(self.ctl(*self.tls(key=garbage), "ping"), "--key: ")

    def test_key_not_matching_certificate(self):
        """A key that belongs to another certificate is a usage error."""
        result = self.ctl(*self.tls(key=self.pki.client_key("TestClient1")), "ping")
        self.assertUsage(result, "--key: private key", "does not match")

    def test_bad_arguments(self):
        """argparse errors (unknown command, bad timeout) exit 2."""
        for argv in (
            ["--server", "http://h:1", "frobnicate"],
            ["--server", "http://h:1", "--timeout", "-1", "ping"],
            ["--server", "http://h:1", "--timeout", "nan", "ping"],
            ["--server", "http://h:1", "tunnels"],
            ["--server", "http://h:1", "tunnels", "put"],
        ):
            result = self.ctl(*argv)
            self.assertEqual(result.status, EXIT_USAGE, argv)
            self.assertIn("threshold-ctl", result.err)

    def test_help(self):
        """--help prints the usage on stdout and exits 0."""
        result = self.ctl("--help")
        self.assertEqual(result.status, 0)
        self.assertIn("tunnels", result.out)

    def test_tunnels_file_errors(self):
        """An unreadable FILE, or one that is not a JSON list, exits 2 first."""
        missing = os.path.join(self.mktemp(), "tunnels.json")
        cases = [
            (missing, b"", f"cannot read {missing}"),
            (self.write(b"[{"), b"", "not JSON: "),
            (self.write(b"\xff[]"), b"", "not UTF-8"),
            (self.write(b"[NaN]"), b"", "NaN"),
            (self.write(b'[{"a": 1, "a": 2}]'), b"", "'a' is given twice"),
            (self.write(b'{"ClientId": "x"}'), b"", "must be a JSON list of tunnels"),
            ("-", b"[", "stdin: not JSON"),
        ]
        for path, stdin, fragment in cases:
            result = self.ctl("--server", "http://h:1", "tunnels", "put", path,
                              stdin=stdin)  # fmt: skip
            self.assertUsage(result, fragment)


class SubprocessTests(TestCase):
    """The real ``main`` in a child process: exit statuses and output streams."""

    timeout = 30

    def spawn(self, *argv: str):
        env = dict(os.environ, PYTHONPATH=ROOT)
        for name in (
            "THRESHOLD_SERVER",
            "THRESHOLD_CA",
            "THRESHOLD_CERT",
            "THRESHOLD_KEY",
        ):
            env.pop(name, None)
        return getProcessOutputAndValue(
            sys.executable, ["-m", "threshold.ctl", *argv], env=env, path=ROOT
        )

    @inlineCallbacks
    def test_exit_statuses(self):
        """0 with pong on stdout, 3 unreachable, 2 usage, errors on stderr."""
        deployment = Deployment(False, self.mktemp())
        self.addCleanup(deployment.stop)
        deployment.start_server()
        url = f"http://127.0.0.1:{deployment.management_port}"
        unreachable = f"http://127.0.0.1:{free_port()}"
        results = yield self.spawn_all(
            ("--server", url, "ping"),
            ("--server", unreachable, "ping"),
            ("--server", url, "tunnels", "put", os.path.join(self.mktemp(), "x")),
        )
        (out, err, status), (_, err3, status3), (_, err2, status2) = results
        self.assertEqual((status, out, err), (0, b"pong\n", b""))
        self.assertEqual(status3, EXIT_UNREACHABLE, err3)
        self.assertIn(b"connection refused", err3)
        self.assertEqual(status2, EXIT_USAGE, err2)
        self.assertEqual(err2.count(b"\n"), 1, err2)

    def spawn_all(self, *argvs: tuple[str, ...]):
        from twisted.internet.defer import gatherResults

        return gatherResults([self.spawn(*argv) for argv in argvs])
