"""Front-end limits, the first-byte timeout and exact byte counts, on loopback.

The logic of each limit is tested in memory (tests/test_frontend.py); these
tests check what real sockets see.
"""

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
from threshold.server.stats import Limit, Refusal


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
    def assert_limit(self, reason, limit):
        users = []
        for _ in range(3):
            user = yield connect_user(self.port)
            yield self.echo_works(user)
            users.append(user)
        extra = yield connect_user(self.port)
        yield extra.done
        self.assertEqual(extra.data, b"")
        stats = self.deployment.server.stats
        self.assertEqual(stats.refused[reason], 1)
        self.assertEqual(stats.limits_hit[limit], 1)
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
        yield self.assert_limit(
            Refusal.LIMIT_SOURCE_IP, Limit.CONNECTIONS_PER_SOURCE_IP
        )
        admission = self.deployment.server.admission
        yield wait_until(lambda: len(admission) == 0, 5, "per-IP counts to drop")

    @inlineCallbacks
    def test_connections_per_tunnel(self):
        """Past MaxConnectionsPerTunnel, the tunnel's new connections are closed."""
        yield self.deploy(max_connections_per_tunnel=3)
        yield self.assert_limit(Refusal.LIMIT_TUNNEL, Limit.CONNECTIONS_PER_TUNNEL)

    @inlineCallbacks
    def test_first_byte_timeout(self):
        """A user silent both ways is closed; one whose service speaks is not."""
        yield self.deploy(public_first_byte_timeout_seconds=0.3)
        greeter = Backend(echo=False, greeting=b"220 ready\r\n")
        greeter_port = yield greeter.start()
        self.addCleanup(greeter.stop)
        self.deployment.start_client(
            "TestClient2", {"smtp": ("127.0.0.1", greeter_port)}
        )
        yield self.deployment.wait_connected("TestClient2")
        smtp_port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [
                tunnel("TestClient1", self.port, "echo"),
                tunnel("TestClient2", smtp_port, "smtp"),
            ]
        )
        self.assertEqual(code, 200, body)
        silent = yield connect_user(self.port)
        waiting = yield connect_user(smtp_port)
        yield silent.done
        self.assertEqual(silent.data, b"")
        yield sleep(0.4)
        self.assertFalse(waiting.done.called)
        self.assertEqual(waiting.data, b"220 ready\r\n")
        stats = self.deployment.server.stats
        self.assertEqual(stats.refused[Refusal.LIMIT_FIRST_BYTE], 1)
        waiting.transport.loseConnection()
        yield waiting.done

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
