"""The fleet's parts that need no etcd: config, If-Match, errors, SO_REUSEPORT."""

from __future__ import annotations

import errno
import json
import os

from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import connect_user, free_port, tunnel
from threshold.cluster.kv import EtcdUnavailable
from threshold.cluster.store import Conflict
from threshold.config import ConfigError, ServerConfig, load_server_config
from threshold.server.fleet import Fleet, FleetError, parse_if_match, read_revision
from threshold.server.reuseport import reuseport_listen
from threshold.server.service import TunnelServer
from threshold.server.tunnels import TunnelError, parse_tunnels

CLUSTER = {"EtcdEndpoints": ["http://127.0.0.1:2379"], "GatewayId": "eu-1"}


class ClusterConfigTests(SynchronousTestCase):
    def load(self, **fields):
        path = os.path.join(self.mktemp() + ".json")
        with open(path, "w") as f:
            json.dump({"UseTls": False, **fields}, f)
        return load_server_config(path)

    def error(self, **fields) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(**fields)
        return str(caught.exception)

    def test_without_cluster_unchanged(self):
        """No Cluster: no fleet, ReusePort off (the gateway works alone)."""
        config = self.load()
        self.assertIsNone(config.cluster)
        self.assertFalse(config.reuses_port)
        self.assertFalse(ServerConfig().reuses_port)

    def test_cluster_defaults(self):
        """Cluster: KeyPrefix /threshold/, ReusePort on unless turned off."""
        config = self.load(Cluster=CLUSTER)
        assert config.cluster is not None
        self.assertEqual(config.cluster.key_prefix, "/threshold/")
        self.assertEqual(config.cluster.gateway_id, "eu-1")
        self.assertEqual(config.cluster.lease_ttl_seconds, 10)
        self.assertIsNone(config.cluster.tls)
        self.assertTrue(config.reuses_port)
        self.assertFalse(self.load(Cluster=CLUSTER, ReusePort=False).reuses_port)
        self.assertTrue(self.load(ReusePort=True).reuses_port)

    def test_errors_name_the_field(self):
        """Each bad Cluster names the field inside it."""
        self.assertIn(
            '"Cluster.GatewayId"', self.error(Cluster={"EtcdEndpoints": ["h"]})
        )
        self.assertIn(
            '"Cluster.KeyPrefix"', self.error(Cluster={**CLUSTER, "KeyPrefix": "/x"})
        )
        self.assertIn(
            '"Cluster.EtcdEndpoints"',
            self.error(Cluster={**CLUSTER, "EtcdEndpoints": []}),
        )
        self.assertIn('unknown field "Foo"', self.error(Cluster={**CLUSTER, "Foo": 1}))
        self.assertIn(
            "together",
            self.error(Cluster={**CLUSTER, "EtcdCaCertificateFile": "ca.pem"}),
        )
        self.assertIn('"Cluster"', self.error(Cluster=[]))
        self.assertIn(
            '"Cluster.GatewayId"', self.error(Cluster={**CLUSTER, "GatewayId": "a/b"})
        )

    def test_tls_files_together(self):
        """The three etcd TLS files make the client's (ca, cert, key)."""
        config = self.load(
            Cluster={
                **CLUSTER,
                "EtcdCaCertificateFile": "/ca.pem",
                "EtcdClientCertificateFile": "/c.pem",
                "EtcdClientKeyFile": "/k.pem",
            }
        )
        assert config.cluster is not None
        self.assertEqual(config.cluster.tls, ("/ca.pem", "/c.pem", "/k.pem"))


class IfMatchTests(SynchronousTestCase):
    def test_forms(self):
        """The ETag's quoted revision, bare digits, a weak tag; none: None."""
        self.assertEqual(parse_if_match(b'"7"'), 7)
        self.assertEqual(parse_if_match(b"12"), 12)
        self.assertEqual(parse_if_match(b'W/"3"'), 3)
        self.assertIsNone(parse_if_match(None))

    def test_garbage_is_400(self):
        """Anything else is refused with 400 (never read as revision 0)."""
        for raw in (b"*", b'"x"', b"", b"-1", b"1" * 20):
            with self.assertRaises(TunnelError) as caught:
                parse_if_match(raw)
            self.assertEqual(caught.exception.status, 400)

    def test_fleet_error_body(self):
        """A fleet error's JSON carries the revisions it names."""
        body = FleetError(409, "changed", CurrentRevision=9).to_json()
        self.assertEqual(body["error"], "changed")
        self.assertEqual(body["CurrentRevision"], 9)

    def test_revision_file(self):
        """The saved revision: missing 0, damaged 0 (etcd is read), else it."""
        state = self.mktemp()
        self.assertEqual(read_revision(None), 0)
        self.assertEqual(read_revision(state), 0)
        with open(state + ".revision", "w") as f:
            f.write("{not json")
        self.assertEqual(read_revision(state), 0)
        with open(state + ".revision", "w") as f:
            json.dump({"Revision": 41}, f)
        self.assertEqual(read_revision(state), 41)


class ReusePortTests(TestCase):
    def test_two_listeners_share_a_port(self):
        """Two SO_REUSEPORT listeners bind one port; users reach it."""
        listen = reuseport_listen(reactor)
        port = free_port()
        ports = []
        for _ in range(2):
            d = listen("127.0.0.1", port, Factory.forProtocol(Protocol))
            ports.append(self.successResultOf(d))
        for p in ports:
            self.addCleanup(p.stopListening)
        self.assertEqual({p.getHost().port for p in ports}, {port})
        return connect_user(port).addCallback(lambda u: u.transport.loseConnection())

    def test_taken_port_is_cannot_listen(self):
        """A port held without SO_REUSEPORT fails as CannotListenError(EADDRINUSE)."""
        held = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(held.stopListening)
        d = reuseport_listen(reactor)("127.0.0.1", held.getHost().port, Factory())
        error = self.failureResultOf(d, CannotListenError).value
        self.assertEqual(error.socketError.errno, errno.EADDRINUSE)

    def test_ipv6(self):
        """An IPv6 address binds an IPv6 socket."""
        port = free_port("::1")
        d = reuseport_listen(reactor)("::1", port, Factory())
        listening = self.successResultOf(d)
        self.addCleanup(listening.stopListening)
        self.assertEqual(listening.getHost().host, "::1")


class _Store:
    """write_tunnels answers what the test says; nothing is watched."""

    def __init__(self, outcome):
        self.outcome = outcome
        self.writes = []

    def write_tunnels(self, document, expected_revision):
        self.writes.append((document, expected_revision))
        if isinstance(self.outcome, Exception):
            return fail(self.outcome)
        return succeed(self.outcome)


def _fleet(outcome, clock=None):
    clock = clock or Clock()
    server = TunnelServer(lambda host, port, factory: None, clock)
    store = _Store(outcome)
    fleet = Fleet(server, store, "a", clock, applied_revision=4, apply_timeout=15)
    return fleet, store, clock


class PutTests(SynchronousTestCase):
    """Fleet.put's answers, with the store's outcomes made up."""

    tunnels = [parse_tunnels([tunnel("c1", 20001, "web")])[0]]

    def error(self, fleet, if_match=None) -> FleetError:
        return self.failureResultOf(fleet.put(self.tunnels, if_match), FleetError).value

    def test_based_on_applied_revision(self):
        """Without If-Match the write is conditioned on the revision applied."""
        fleet, store, _ = _fleet(Conflict(4, 9))
        error = self.error(fleet)
        self.assertEqual(store.writes[0][1], 4)
        self.assertEqual((error.status, error.revisions), (409, {"CurrentRevision": 9}))

    def test_if_match_mismatch_is_412(self):
        """If-Match's revision is the condition; a stale one answers 412."""
        fleet, store, _ = _fleet(Conflict(2, 9))
        error = self.error(fleet, b'"2"')
        self.assertEqual(store.writes[0][1], 2)
        self.assertEqual(error.status, 412)
        self.assertIn("revision 9", error.message)

    def test_etcd_unavailable_is_503(self):
        """etcd down: 503 naming the cause; 'may have been applied' if unknown."""
        fleet, _, _ = _fleet(EtcdUnavailable(["http://e:2379"], "refused"))
        error = self.error(fleet)
        self.assertEqual(error.status, 503)
        self.assertIn("refused", error.message)
        self.assertIn("was not written", error.message)
        fleet, _, _ = _fleet(EtcdUnavailable(["e"], "timed out", outcome_unknown=True))
        self.assertIn("may have been applied", self.error(fleet).message)

    def test_not_applied_in_time_is_504(self):
        """Written, but this gateway's watch never applied it: 504 after the bound."""
        fleet, _, clock = _fleet(7)
        d = fleet.put(self.tunnels, None)
        self.assertNoResult(d)
        clock.advance(14.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        error = self.failureResultOf(d, FleetError).value
        self.assertEqual((error.status, error.revisions["Revision"]), (504, 7))

    def test_answered_once_applied(self):
        """The PUT answers when the watch's apply of its revision is done."""
        fleet, _, _ = _fleet(7)
        d = fleet.put(self.tunnels, None)
        self.assertNoResult(d)
        fleet._applied([], 7)
        self.assertEqual(self.successResultOf(d), ([], 7))
        self.assertEqual(fleet.etag(), b'"7"')

    def test_failure_seen_before_the_answer(self):
        """A watch that failed the revision before the write answered: the error."""
        fleet, _, _ = _fleet(7)
        fleet._failed(7, TunnelError(409, "entry 0: address in use"))
        error = self.error(fleet)
        self.assertEqual(error.status, 409)
        self.assertIn("not applied on this gateway", error.message)
        self.assertEqual(
            fleet.status()["Errors"][0]["error"], "entry 0: address in use"
        )
