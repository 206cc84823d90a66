"""Egress on real loopback sockets: curl through the client's SOCKS5 proxy.

A gateway and three clients in process, each client with its own SOCKS5
listener: ``home-a`` may reach 127.0.0.0/8 on the HTTP server's port only
(a rule naming loopback explicitly), ``home-b`` may reach 0.0.0.0/0 on
every port (which must NOT reach loopback), ``home-c`` has no entry. curl
(``--socks5-hostname``: the name goes to the proxy, resolved on the
gateway) is the SOCKS5 client.
"""

from __future__ import annotations

import re

from twisted.internet import reactor, utils
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from tests.components import require_tool
from tests.support import Deployment, free_port, metric, wait_until
from threshold.config.egress import EGRESS_POLICY, EgressSettings
from threshold.config.policy import ClientPolicy, FrozenMap
from threshold.server.metrics import render, server_registry
from threshold.wire.egress import EgressRefusal

BODY = b"hello through the gateway\n" * 100


def socks_reply(stderr: bytes) -> int | None:
    """The SOCKS5 reply code curl reports ("... connection to X. (2)")."""
    found = re.search(rb"socks5 connection to .*\((\d+)\)", stderr.lower())
    return int(found.group(1)) if found else None


class EgressCurlTests(TestCase):
    """curl → SOCKS5 on the client → odd stream → gateway → loopback HTTP."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.curl = require_tool("curl")
        root = Resource()
        root.putChild(b"", Data(BODY, "text/plain"))
        self.http = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(root)
        )
        self.addCleanup(self.http.stopListening)
        self.http_port = self.http.getHost().port
        self.closed_port = free_port()
        policy = EGRESS_POLICY.check(
            {
                "home-a": [
                    {"Cidr": "127.0.0.0/8", "Ports": f"{self.http_port}"},
                    {"Cidr": "127.0.0.1/32", "Ports": f"{self.closed_port}"},
                ],
                "home-b": [{"Cidr": "0.0.0.0/0", "Ports": "1-65535"}],
            }
        )
        self.deployment = Deployment(
            False,
            self.mktemp(),
            egress_policy=policy,
            client_policies=FrozenMap({"home-a": ClientPolicy(quota_bytes=10**9)}),
        )
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.socks = {}
        for client_id in ("home-a", "home-b", "home-c"):
            port = free_port()
            self.socks[client_id] = port
            self.deployment.start_client(
                client_id,
                {},
                egress=EgressSettings(socks_listen=("127.0.0.1", port)),
            )
            yield self.deployment.wait_connected(client_id)

    def fetch(self, client_id: str, url: str):
        """Run curl through ``client_id``'s proxy: (stdout, stderr, exit code)."""
        return utils.getProcessOutputAndValue(
            self.curl,
            [
                "--silent",
                "--show-error",
                "--max-time",
                "20",
                "--socks5-hostname",
                f"127.0.0.1:{self.socks[client_id]}",
                url,
            ],
            env={},
        )

    @property
    def egress(self):
        return self.deployment.server.stats.egress.clients

    @inlineCallbacks
    def test_allowed_loopback_by_address(self):
        """A rule within 127.0.0.0/8 reaches the loopback server; bytes and the
        quota are counted, the metrics show them, the session stays."""
        out, err, code = yield self.fetch(
            "home-a", f"http://127.0.0.1:{self.http_port}/"
        )
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out, BODY)
        yield wait_until(lambda: self.egress["home-a"].open == 0, 5, "stream closed")
        traffic = self.egress["home-a"]
        self.assertEqual(traffic.connected, 1)
        self.assertGreater(traffic.bytes_received, len(BODY))
        self.assertGreater(traffic.bytes_sent, 20)  # the GET request
        account = self.deployment.server.policy.quota.account("home-a")
        self.assertEqual(account.used, traffic.bytes_received + traffic.bytes_sent)
        text = render(server_registry(self.deployment.server)).decode()
        self.assertEqual(
            metric(
                text, "threshold_client_egress_received_bytes_total", client_id="home-a"
            ),
            traffic.bytes_received,
        )
        self.assertEqual(
            metric(
                text, "threshold_client_egress_connections_total", client_id="home-a"
            ),
            1,
        )
        self.assertTrue(self.deployment.server.registry.is_connected("home-a"))

    @inlineCallbacks
    def test_allowed_by_name(self):
        """``localhost`` is resolved on the gateway and reaches 127.0.0.1."""
        out, err, code = yield self.fetch(
            "home-a", f"http://localhost:{self.http_port}/"
        )
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out, BODY)
        yield wait_until(lambda: self.egress["home-a"].open == 0, 5, "stream closed")
        self.assertEqual(self.egress["home-a"].connected, 1)

    @inlineCallbacks
    def test_other_port_refused(self):
        """A port no rule names: "not allowed by ruleset", counted."""
        port = free_port()
        out, err, code = yield self.fetch("home-a", f"http://127.0.0.1:{port}/")
        self.assertNotEqual(code, 0)
        self.assertEqual(socks_reply(err), 2)  # not allowed by ruleset
        self.assertEqual(self.egress["home-a"].refused[EgressRefusal.NOT_ALLOWED], 1)
        self.assertEqual(self.egress["home-a"].connected, 0)

    @inlineCallbacks
    def test_any_address_does_not_reach_loopback(self):
        """0.0.0.0/0 alone does not name loopback: 127.0.0.1 is refused."""
        out, err, code = yield self.fetch(
            "home-b", f"http://127.0.0.1:{self.http_port}/"
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(socks_reply(err), 2)  # not allowed by ruleset
        self.assertEqual(self.egress["home-b"].refused[EgressRefusal.NOT_ALLOWED], 1)

    @inlineCallbacks
    def test_name_resolving_to_forbidden_address(self):
        """A name that resolves to loopback is checked after the lookup: refused."""
        out, err, code = yield self.fetch(
            "home-b", f"http://localhost:{self.http_port}/"
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(socks_reply(err), 2)  # not allowed by ruleset
        self.assertEqual(self.egress["home-b"].refused[EgressRefusal.NOT_ALLOWED], 1)
        self.assertEqual(self.egress["home-b"].connected, 0)

    @inlineCallbacks
    def test_client_without_policy(self):
        """A client with no EgressPolicy entry is refused; its session stays up."""
        out, err, code = yield self.fetch(
            "home-c", f"http://127.0.0.1:{self.http_port}/"
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(socks_reply(err), 2)  # not allowed by ruleset
        self.assertEqual(self.egress["home-c"].refused[EgressRefusal.NO_POLICY], 1)
        self.assertTrue(self.deployment.server.registry.is_connected("home-c"))
        # And again: the session still carries egress requests.
        out, err, code = yield self.fetch(
            "home-c", f"http://127.0.0.1:{self.http_port}/"
        )
        self.assertEqual(self.egress["home-c"].refused[EgressRefusal.NO_POLICY], 2)

    @inlineCallbacks
    def test_connection_refused(self):
        """An allowed destination with nothing listening: "connection refused"."""
        out, err, code = yield self.fetch(
            "home-a", f"http://127.0.0.1:{self.closed_port}/"
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(socks_reply(err), 5)  # connection refused
        self.assertEqual(
            self.egress["home-a"].refused[EgressRefusal.CONNECTION_REFUSED], 1
        )

    @inlineCallbacks
    def test_unknown_name(self):
        """A name that does not resolve: "host unreachable"."""
        out, err, code = yield self.fetch(
            "home-b", f"http://no-such-host.invalid:{self.http_port}/"
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(socks_reply(err), 4)  # host unreachable
        self.assertEqual(
            self.egress["home-b"].refused[EgressRefusal.NAME_NOT_RESOLVED], 1
        )
