"""Front-end limits, idle timeout and exact byte counts, on loopback."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


class LimitTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def deploy(self, **fields):
        self.backend = Backend(echo=True)
        backend_port = yield self.backend.start()
        self.addCleanup(self.backend.stop)
        self.deployment = Deployment(False, self.mktemp(), **fields)
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.deployment.start_client(
            "TestClient1", {"echo": ("127.0.0.1", backend_port)}
        )
        yield self.deployment.wait_connected("TestClient1")
        self.port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient1", self.port, "echo")]
        )
        self.assertEqual(code, 200, body)

    @inlineCallbacks
    def echo_works(self, user):
        user.transport.write(b"ping")
        yield wait_until(lambda: user.data == b"ping", 5, "echo")

    @inlineCallbacks
    def assert_limit(self, which):
        users = []
        for _ in range(3):
            user = yield connect_user(self.port)
            yield self.echo_works(user)
            users.append(user)
        extra = yield connect_user(self.port)
        yield extra.done
        self.assertEqual(extra.data, b"")
        stats = self.deployment.server.stats
        self.assertEqual(stats.refused_limit[which], 1)
        self.assertEqual(
            self.deployment.server.limits_hit[f"connections_per_{which}"], 1
        )
        # A slot freed is a slot usable again.
        users[0].transport.loseConnection()
        yield users[0].done
        yield wait_until(lambda: stats.open == 2, 5, "the slot to free")
        again = yield connect_user(self.port)
        yield self.echo_works(again)
        for user in users[1:] + [again]:
            user.transport.loseConnection()
            yield user.done

    @inlineCallbacks
    def test_connections_per_source_ip(self):
        """Past MaxConnectionsPerSourceIp, a source's new connections are closed."""
        yield self.deploy(max_connections_per_source_ip=3)
        yield self.assert_limit("source_ip")
        stats = self.deployment.server.stats
        yield wait_until(lambda: stats.per_ip == {}, 5, "per-IP counts to drop")

    @inlineCallbacks
    def test_connections_per_tunnel(self):
        """Past MaxConnectionsPerTunnel, the tunnel's new connections are closed."""
        yield self.deploy(max_connections_per_tunnel=3)
        yield self.assert_limit("tunnel")

    @inlineCallbacks
    def test_idle_timeout(self):
        """A connection idle past the timeout is closed; an active one is not."""
        yield self.deploy(public_idle_timeout_seconds=0.4)
        idle = yield connect_user(self.port)
        active = yield connect_user(self.port)
        yield self.echo_works(idle)
        for _ in range(8):
            active.transport.write(b"x")
            yield sleep(0.1)
        self.assertTrue(idle.done.called)
        self.assertFalse(active.done.called)
        self.assertEqual(self.deployment.server.stats.refused_limit["idle"], 1)
        active.transport.loseConnection()
        yield active.done

    @inlineCallbacks
    def test_byte_counts_exact(self):
        """Per-tunnel and per-client byte counters count every relayed byte."""
        yield self.deploy()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sizes = [1, 1000, 300_001]
        for size in sizes:
            user = yield connect_user(self.port)
            user.transport.write(os.urandom(size))
            user.transport.loseWriteConnection()
            yield user.done
            self.assertEqual(len(user.data), size)
        stats = self.deployment.server.stats
        yield wait_until(lambda: stats.open == 0, 5, "connections to end")
        total = sum(sizes)
        traffic = stats.tunnels[("127.0.0.1", self.port, "*")]
        self.assertEqual(
            (traffic.accepted, traffic.open, traffic.bytes_in, traffic.bytes_out),
            (3, 0, total, total),
        )
        client = stats.clients["TestClient1"]
        self.assertEqual((client.bytes_in, client.bytes_out), (total, total))
        # One summary line per connection, with its own byte counts.
        summaries = [e for e in events if "bytes_out" in e and "duration" in e]
        self.assertEqual(
            sorted((e["bytes_in"], e["bytes_out"]) for e in summaries),
            [(n, n) for n in sorted(sizes)],
        )
        self.assertEqual({e["client"] for e in summaries}, {"TestClient1"})
        self.assertEqual({e["end"] for e in summaries}, {"closed"})
