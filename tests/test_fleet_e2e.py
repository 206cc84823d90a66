"""Gateways of one fleet against a real etcd (Debian's etcd-server).

Each gateway is a real TunnelServer with its sockets on loopback; the
ones that must die for real run under twistd. Measured bounds are printed
(``trial`` shows them with ``--verbose`` off too, in the test log).
"""

from __future__ import annotations

import os
import time
import uuid

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.etcdkit import etcd_for_test, shared_etcd
from tests.fleetkit import (
    GatewayProcess,
    fleet_of,
    gateway,
    put,
    wait_ready,
    wait_revision,
)
from tests.support import Backend, connect_user, free_port, tunnel, wait_until
from threshold.config.client import ServerEntry

#: PUT on one gateway to listening on the other: measured ~20-60 ms on a
#: loaded 2-core box; the bound leaves room for a slow CI runner.
PROPAGATION_BOUND = 2.0


def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:12]}/"


def key_of(port: int) -> tuple[str, int]:
    return ("127.0.0.1", port)


class FleetTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def two(self, etcd=None, **fields):
        etcd = etcd or shared_etcd()
        where = prefix()
        a = gateway(self, etcd, where, "a", **fields)
        b = gateway(self, etcd, where, "b", **fields)
        yield wait_ready(a, b)
        return a, b

    @inlineCallbacks
    def test_put_reaches_other_gateway(self):
        """A PUT on A answers once A applied it; B listens within the bound."""
        a, b = yield self.two()
        port = free_port()
        started = time.monotonic()
        code, body, etag = yield put(a, [tunnel("c1", port, "web")])
        answered = time.monotonic()
        self.assertEqual(code, 200, body)
        self.assertEqual([t["ListenPort"] for t in body], [port])
        revision = fleet_of(a).applied_revision
        self.assertEqual(etag, f'"{revision}"')
        self.assertIsNotNone(a.server.routes.listening_port(key_of(port)))
        yield wait_until(
            lambda: b.server.routes.listening_port(key_of(port)) is not None,
            PROPAGATION_BOUND,
            "B to listen",
        )
        on_b = time.monotonic() - started
        print(f"\nPUT answered on A in {answered - started:.3f}s, B in {on_b:.3f}s")
        self.assertEqual(fleet_of(b).applied_revision, revision)
        # GET /tunnels stays the plain list, the revision in ETag.
        response = yield b.http().get(b.url("/tunnels"))
        self.assertEqual(response.headers.getRawHeaders("etag"), [f'"{revision}"'])
        yield wait_until(
            lambda: (
                [s.get("Revision") for s in fleet_of(b).statuses().values()]
                == [revision, revision]
            ),
            5,
            "both statuses at the revision",
        )
        code, status = yield b.get_json("/tunnels/status")
        self.assertEqual(sorted(status["Gateways"]), ["a", "b"])
        self.assertEqual(status["Gateways"]["a"]["Revision"], revision)
        # Both share the public port (SO_REUSEPORT, the default in a fleet).
        user = yield connect_user(port)
        self.assertTrue(user.transport.connected)
        user.transport.loseConnection()

    @inlineCallbacks
    def test_concurrent_puts_one_wins(self):
        """Two PUTs at once on two gateways: one 200, one 409; same set after."""
        a, b = yield self.two()
        p1, p2 = free_port(), free_port()
        results = yield gatherResults(
            [put(a, [tunnel("c1", p1, "web")]), put(b, [tunnel("c2", p2, "web")])]
        )
        codes = sorted(code for code, _, _ in results)
        self.assertEqual(codes, [200, 409], results)
        lost = next(body for code, body, _ in results if code == 409)
        self.assertIn("CurrentRevision", lost)
        self.assertIn("changed", lost["error"])
        yield wait_until(
            lambda: fleet_of(a).applied_revision == fleet_of(b).applied_revision > 0,
            5,
            "both at one revision",
        )
        self.assertEqual(
            [t.to_json() for t in a.server.routes.tunnels()],
            [t.to_json() for t in b.server.routes.tunnels()],
        )
        self.assertEqual(lost["CurrentRevision"], fleet_of(a).applied_revision)

    @inlineCallbacks
    def test_if_match(self):
        """If-Match: a stale revision 412, the current one 200, garbage 400."""
        a, b = yield self.two()
        code, _, etag = yield put(a, [tunnel("c1", free_port(), "web")])
        self.assertEqual(code, 200)
        code, body, _ = yield put(b, [tunnel("c1", free_port(), "web")], '"1"')
        self.assertEqual(code, 412, body)
        self.assertEqual(f'"{body["CurrentRevision"]}"', etag)
        code, body, _ = yield put(b, [], "yesterday")
        self.assertEqual(code, 400, body)
        yield wait_revision(b, int(etag.strip('"')))
        code, body, new = yield put(b, [], etag)
        self.assertEqual(code, 200, body)
        self.assertEqual(body, [])
        self.assertNotEqual(new, etag)

    @inlineCallbacks
    def test_invalid_put_writes_nothing(self):
        """A set refused by validation never reaches etcd (revision unchanged)."""
        a, b = yield self.two()
        code, body, _ = yield put(a, [{"ClientId": "c1"}])
        self.assertEqual(code, 400, body)
        self.assertEqual(fleet_of(a).applied_revision, 0)

    @inlineCallbacks
    def test_unbindable_set_reported_per_gateway(self):
        """A set B cannot bind: A serves it, B keeps its set and says why."""
        a, b = yield self.two()
        port = free_port()
        # Something else (no SO_REUSEPORT) holds the port on B's behalf...
        from twisted.internet.protocol import Factory

        blocker = reactor.listenTCP(port, Factory(), interface="127.0.0.1")
        self.addCleanup(blocker.stopListening)
        code, body, _ = yield put(a, [tunnel("c1", port, "web")])
        self.assertEqual(code, 409, body)  # ...and on A: both fail the same way
        self.assertIn("not applied on this gateway", body["error"])
        revision = body["Revision"]
        yield wait_until(lambda: fleet_of(b).errors, 5, "B to report")
        self.assertEqual(fleet_of(b).applied_revision, 0)
        code, status = yield a.get_json("/tunnels/status")
        yield wait_until(
            lambda: (
                fleet_of(a).statuses().get("b", {}).get("LatestRevision") == revision
            ),
            5,
            "B's status in etcd",
        )
        self.assertTrue(fleet_of(a).statuses()["b"]["Errors"])
        response = yield a.http().get(a.url("/metrics"))
        text = (yield response.content()).decode()
        self.assertIn("threshold_cluster_apply_errors 1.0", text)
        self.assertIn("threshold_cluster_etcd_up 1.0", text)

    @inlineCallbacks
    def test_thousand_tunnels(self):
        """1,000 entries (10 ports x 100 hostname globs): time to apply on each."""
        a, b = yield self.two()
        ports = [free_port() for _ in range(10)]
        tunnels = [
            tunnel(f"c{i % 7}", port, "web", ListenHostnameGlob=f"h{i}.example.com")
            for port in ports
            for i in range(100)
        ]
        started = time.monotonic()
        code, body, etag = yield put(a, tunnels)
        on_a = time.monotonic() - started
        self.assertEqual(code, 200, body if code != 200 else "")
        self.assertEqual(len(body), 1000)
        yield wait_revision(b, int(etag.strip('"')))
        on_b = time.monotonic() - started
        print(f"\n1,000 tunnels: applied on A {on_a:.3f}s, on B {on_b:.3f}s")
        self.assertEqual(len(b.server.routes.tunnels()), 1000)
        self.assertEqual(len(b.server.routes.groups()), 10)


class FleetFaultTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_etcd_down_and_back(self):
        """etcd killed: both serve, PUT 503; back: a PUT reaches both."""
        etcd = etcd_for_test(self)
        where = prefix()
        a = gateway(self, etcd, where, "a")
        b = gateway(self, etcd, where, "b")
        yield wait_ready(a, b)
        backend = Backend()
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        # The public port is shared: a user may land on either gateway, so
        # the client holds a session to both.
        a.start_client(
            "c1",
            {"web": ("127.0.0.1", backend_port)},
            servers=(
                ServerEntry(host="127.0.0.1", tunnel_control_port=a.control_port),
                ServerEntry(host="127.0.0.1", tunnel_control_port=b.control_port),
            ),
        )
        yield a.wait_connected("c1")
        yield b.wait_connected("c1")
        port = free_port()
        code, body, _ = yield put(a, [tunnel("c1", port, "web")])
        self.assertEqual(code, 200, body)
        etcd.kill()
        code, body, _ = yield put(a, [tunnel("c1", free_port(), "web")])
        self.assertEqual(code, 503, body)
        self.assertIn("etcd is unavailable", body["error"])
        # Still serving the last set.
        user = yield connect_user(port)
        user.transport.write(b"ping")
        yield wait_until(lambda: user.data == b"ping", 5, "echo")
        user.transport.loseConnection()
        yield wait_until(lambda: not fleet_of(b).etcd_up, 10, "B to see etcd down")
        yield etcd.restart(reactor)
        yield wait_ready(a, b, timeout=30)
        port2 = free_port()
        code, body, etag = yield put(a, [tunnel("c1", port2, "web")])
        self.assertEqual(code, 200, body)
        yield wait_revision(b, int(etag.strip('"')))
        self.assertIsNotNone(b.server.routes.listening_port(key_of(port2)))

    @inlineCallbacks
    def test_restart_while_etcd_down(self):
        """A gateway restarted while etcd is down comes up with its last set,
        then resumes the watch without applying that set again."""
        etcd = etcd_for_test(self)
        where = prefix()
        state = os.path.join(self.mktemp() + "-state.json")
        a = gateway(self, etcd, where, "a", state_file=state)
        yield wait_ready(a)
        port = free_port()
        code, body, etag = yield put(a, [tunnel("c1", port, "web")])
        self.assertEqual(code, 200, body)
        yield a.stop_server()
        etcd.kill()
        a.start_server()
        yield wait_until(
            lambda: a.server.routes.listening_port(key_of(port)) is not None,
            5,
            "the restored set",
        )
        self.assertEqual(f'"{fleet_of(a).applied_revision}"', etag)
        yield etcd.restart(reactor)
        yield wait_ready(a, timeout=30)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(fleet_of(a).applies, 0)

    @inlineCallbacks
    def test_watch_after_compaction(self):
        """A gateway away while two sets were written and etcd compacted
        applies the newest one, once."""
        etcd = etcd_for_test(self)
        where = prefix()
        a = gateway(self, etcd, where, "a")
        b = gateway(self, etcd, where, "b")
        yield wait_ready(a, b)
        code, _, etag = yield put(a, [tunnel("c1", free_port(), "web")])
        yield wait_revision(b, int(etag.strip('"')))
        fleet_b = fleet_of(b)
        yield fleet_b.stopService()
        last = free_port()
        code, _, _ = yield put(a, [tunnel("c1", free_port(), "web")])
        code, _, etag = yield put(a, [tunnel("c1", last, "web")])
        self.assertEqual(code, 200)
        etcd.compact()
        applies = fleet_b.applies
        fleet_b.startService()
        yield wait_revision(b, int(etag.strip('"')))
        self.assertEqual(fleet_b.applies, applies + 1)
        self.assertIsNotNone(b.server.routes.listening_port(key_of(last)))

    @inlineCallbacks
    def test_hello_reply_names_the_gateway(self):
        """In a fleet the hello reply carries GatewayId: the client knows
        which gateway each of its sessions is with."""
        a = gateway(self, shared_etcd(), prefix(), "eu-1")
        yield wait_ready(a)
        client = a.start_client("c1", {"web": ("127.0.0.1", 1)})
        yield a.wait_connected("c1")
        links = [s.link for s in client if hasattr(s, "link")]
        yield wait_until(lambda: links[0].gateway_id is not None, 5, "the hello reply")
        self.assertEqual([link.gateway_id for link in links], ["eu-1"])

    @inlineCallbacks
    def test_killed_gateway_drops_out(self):
        """GET /clients shows the fleet's clients; a gateway killed for real
        drops out (its clients with it) within the lease TTL."""
        etcd = shared_etcd()
        where = prefix()
        ttl = 2
        b = gateway(self, etcd, where, "b", ttl=ttl)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        a = GatewayProcess(
            directory,
            {
                "Cluster": {
                    "EtcdEndpoints": [etcd.url],
                    "KeyPrefix": where,
                    "GatewayId": "a",
                    "LeaseTtlSeconds": ttl,
                }
            },
        )
        a.start()
        self.addCleanup(a.kill)
        a.wait_serving()
        backend = Backend()
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        b.start_client(
            "c1",
            {"web": ("127.0.0.1", backend_port)},
            server_tunnel_control_port=a.control_port,
        )
        yield wait_until(lambda: "c1" in fleet_of(b).clients({}), 10, "c1 seen from B")
        code, clients = yield b.get_json("/clients")
        self.assertEqual(clients["c1"]["Gateways"], ["a"])
        self.assertEqual(clients["c1"]["CurrentState"], "ClientConnected")
        killed = time.monotonic()
        a.kill()
        yield wait_until(
            lambda: "c1" not in fleet_of(b).clients({}), ttl + 3, "c1 gone from B"
        )
        gone = time.monotonic() - killed
        print(f"\nkilled gateway's client gone from B after {gone:.2f}s (TTL {ttl}s)")
        code, clients = yield b.get_json("/clients")
        self.assertNotIn("c1", clients)


class FleetTlsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_gateways_over_tls_to_etcd(self):
        """With the three Etcd*File fields, gateways reach an etcd that
        requires client certificates; a PUT on one reaches the other."""
        etcd = shared_etcd(tls=True)
        ca, cert, key = etcd.tls.client("operator")
        where = prefix()
        settings = {
            "etcd_ca_certificate_file": ca,
            "etcd_client_certificate_file": cert,
            "etcd_client_key_file": key,
        }
        a = gateway(self, etcd, where, "a", cluster_tls=settings)
        b = gateway(self, etcd, where, "b", cluster_tls=settings)
        yield wait_ready(a, b)
        port = free_port()
        code, body, etag = yield put(a, [tunnel("c1", port, "web")])
        self.assertEqual(code, 200, body)
        yield wait_revision(b, int(etag.strip('"')))
        self.assertIsNotNone(b.server.routes.listening_port(key_of(port)))
